//! Generation through an OpenAI-compatible completions endpoint (vLLM, SGLang, llama.cpp's
//! server, ...): `POST {base_url}/v1/completions` with
//! `{model, prompt, max_tokens, temperature, top_p, seed, stop}`, the completion read from
//! `choices[0].text`. With a LoRA module loaded in the server, `model` is the adapter's name
//! (vLLM: `--lora-modules NAME=PATH`).
//!
//! - `base_url` is `http://host:port` or `https://host:port`, optionally with a trailing `/v1`
//!   (OpenAI-style base URLs are accepted). https uses rustls (ring); certificates are checked
//!   against the system's CA bundle (`$SSL_CERT_FILE`, else `/etc/ssl/certs/ca-certificates.crt`
//!   or `/etc/pki/tls/certs/ca-bundle.crt`), or Mozilla's roots (webpki-roots) without one.
//! - Each request has its own `timeout` (connect + send + the whole answer). A request that
//!   times out is not retried (a generation that took too long will take too long again).
//! - Connection errors, 429 and 5xx are retried up to `retries` times with exponential backoff
//!   (`backoff`, doubled each time, at most 30 s; a 429's `Retry-After` in seconds is obeyed, at
//!   most 60 s). Other 4xx are not retried: 400 is the prompt's own problem (e.g. longer than
//!   the model's context), 401/403/404/405 (bad key, unknown model, wrong URL) are everyone's.
//! - [`Generator::generate_all`] keeps at most `concurrency` requests in flight and returns the
//!   results in the prompts' order. After an error that every later request would hit too
//!   (the server unreachable or still failing after the retries, 401/403/404/405), the prompts
//!   not yet sent fail at once with that error instead of each waiting through its own retries.
//!
//! Errors are [`EvalError::Endpoint`] naming the URL, with the HTTP status and an excerpt of
//! the answer's body.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use serde_json::{json, Value};

use crate::generate::{cut_at_stop, GenerationParams, Generator};
use crate::EvalError;

/// Longest wait between two tries.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Longest `Retry-After` obeyed.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);
/// Characters of a response body quoted in an error.
const EXCERPT_CHARS: usize = 300;

/// An OpenAI-compatible completions endpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct Endpoint {
    /// `http(s)://host:port`, with or without a trailing `/v1`.
    pub base_url: String,
    /// The served model's name, or the LoRA adapter's name.
    pub model: String,
    /// Sent as `Authorization: Bearer <key>`.
    pub api_key: Option<String>,
    /// Limit of each request (connect, send, wait for and read the answer).
    pub timeout: Duration,
    /// Tries after the first one on connection errors, 429 and 5xx.
    pub retries: u32,
    /// Requests in flight at most in [`Generator::generate_all`] (at least 1).
    pub concurrency: usize,
    /// Wait before the first retry, doubled for each next one.
    pub backoff: Duration,
}

impl Endpoint {
    /// An endpoint with the defaults: no key, 600 s timeout, 4 retries from 0.5 s, 8 requests
    /// in flight.
    pub fn new(base_url: &str, model: &str) -> Self {
        Self {
            base_url: base_url.into(),
            model: model.into(),
            api_key: None,
            timeout: Duration::from_secs(600),
            retries: 4,
            concurrency: 8,
            backoff: Duration::from_millis(500),
        }
    }

    /// The URL requests go to: `{base_url}/v1/completions`.
    pub fn completions_url(&self) -> Result<String, EvalError> {
        let base = self.base_url.trim().trim_end_matches('/');
        let base = base.strip_suffix("/v1").unwrap_or(base);
        let invalid = |message: String| EvalError::Endpoint {
            url: self.base_url.clone(),
            message,
        };
        let Some((scheme, rest)) = base.split_once("://") else {
            return Err(invalid(
                "expected http://host:port or https://host:port".into(),
            ));
        };
        if !matches!(scheme, "http" | "https") {
            return Err(invalid(format!(
                "scheme {scheme}:// is not supported (expected http:// or https://)"
            )));
        }
        if rest.is_empty() || rest.starts_with('/') {
            return Err(invalid("no host in the URL".into()));
        }
        Ok(format!("{base}/v1/completions"))
    }

    fn agent(&self, url: &str) -> ureq::Agent {
        let mut config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(self.timeout))
            .max_idle_connections_per_host(self.concurrency.max(1))
            .user_agent(concat!("finetune/", env!("CARGO_PKG_VERSION")));
        if url.starts_with("https://") {
            if let Some(roots) = system_root_certs() {
                config = config.tls_config(
                    ureq::tls::TlsConfig::builder()
                        .root_certs(roots.clone())
                        .build(),
                );
            }
        }
        if is_loopback(url) {
            // A proxy from the environment cannot reach our own loopback.
            config = config.proxy(None);
        }
        config.build().into()
    }

    fn request_body(&self, prompt: &str, params: &GenerationParams) -> String {
        let mut body = json!({
            "model": self.model,
            "prompt": prompt,
            "max_tokens": params.max_new_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "seed": params.seed,
        });
        if !params.stop.is_empty() {
            body["stop"] = json!(params.stop);
        }
        body.to_string()
    }

    /// One prompt, with retries.
    fn complete(
        &self,
        agent: &ureq::Agent,
        url: &str,
        prompt: &str,
        params: &GenerationParams,
    ) -> Result<String, Failure> {
        let body = self.request_body(prompt, params);
        let mut attempt = 0u32;
        loop {
            let failure = match self.send_once(agent, url, &body) {
                Ok(text) => return Ok(cut_at_stop(&text, &params.stop).to_string()),
                Err(f) => f,
            };
            if !failure.retryable || attempt >= self.retries {
                let tries = attempt + 1;
                return Err(if tries > 1 {
                    Failure {
                        message: format!("{} (after {tries} tries)", failure.message),
                        ..failure
                    }
                } else {
                    failure
                });
            }
            let backoff = self
                .backoff
                .saturating_mul(1u32 << attempt.min(16))
                .min(MAX_BACKOFF);
            std::thread::sleep(failure.retry_after.unwrap_or(backoff));
            attempt += 1;
        }
    }

    fn send_once(&self, agent: &ureq::Agent, url: &str, body: &str) -> Result<String, Failure> {
        let mut request = agent
            .post(url)
            .header("Content-Type", "application/json")
            .header("Accept", "application/json");
        if let Some(key) = &self.api_key {
            request = request.header("Authorization", format!("Bearer {key}"));
        }
        let response = match request.send(body) {
            Ok(r) => r,
            Err(e) => return Err(Failure::transport(e, self.timeout)),
        };
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(|s| Duration::from_secs(s).min(MAX_RETRY_AFTER));
        let text = match response.into_body().read_to_string() {
            Ok(t) => t,
            Err(e) => return Err(Failure::transport(e, self.timeout)),
        };
        if !(200..300).contains(&status) {
            let retryable = status == 429 || (500..600).contains(&status);
            return Err(Failure {
                message: format!("HTTP {status}: {}", excerpt(&text)),
                retryable,
                // Every later request would get the same answer.
                fatal: retryable || matches!(status, 401 | 403 | 404 | 405),
                retry_after: if status == 429 { retry_after } else { None },
            });
        }
        let parsed: Value = serde_json::from_str(&text).map_err(|e| Failure {
            message: format!(
                "HTTP {status} but the body is not JSON ({e}): {}",
                excerpt(&text)
            ),
            ..Failure::default()
        })?;
        match parsed.pointer("/choices/0/text").and_then(Value::as_str) {
            Some(t) => Ok(t.to_string()),
            None => Err(Failure {
                message: format!("no choices[0].text in the answer: {}", excerpt(&text)),
                ..Failure::default()
            }),
        }
    }

    fn error(&self, url: &str, message: String) -> EvalError {
        EvalError::Endpoint {
            url: url.to_string(),
            message: format!("model {}: {message}", self.model),
        }
    }
}

/// Why one request failed.
#[derive(Debug, Clone, Default)]
struct Failure {
    message: String,
    /// Worth another try (connection error, 429, 5xx).
    retryable: bool,
    /// Once the retries are spent, every later request would fail the same way.
    fatal: bool,
    retry_after: Option<Duration>,
}

impl Failure {
    fn transport(e: ureq::Error, timeout: Duration) -> Self {
        use ureq::Error as E;
        match e {
            E::Timeout(t) => Failure {
                message: format!("timed out after {timeout:?} ({t})"),
                ..Failure::default()
            },
            E::Io(io) if io.kind() == std::io::ErrorKind::TimedOut => Failure {
                message: format!("timed out after {timeout:?} ({io})"),
                ..Failure::default()
            },
            E::Io(_) | E::ConnectionFailed | E::HostNotFound | E::Protocol(_) | E::BodyStalled => {
                Failure {
                    message: format!("connection failed: {e}"),
                    retryable: true,
                    fatal: true,
                    retry_after: None,
                }
            }
            other => Failure {
                message: other.to_string(),
                fatal: true,
                ..Failure::default()
            },
        }
    }
}

impl Generator for Endpoint {
    fn describe(&self) -> String {
        format!("{} model={}", self.base_url, self.model)
    }

    fn generate(&self, prompt: &str, params: &GenerationParams) -> Result<String, EvalError> {
        let url = self.completions_url()?;
        let agent = self.agent(&url);
        self.complete(&agent, &url, prompt, params)
            .map_err(|f| self.error(&url, f.message))
    }

    fn generate_all(
        &self,
        prompts: &[String],
        params: &GenerationParams,
    ) -> Vec<Result<String, EvalError>> {
        let url = match self.completions_url() {
            Ok(u) => u,
            Err(e) => {
                let message = e.to_string();
                return prompts
                    .iter()
                    .map(|_| Err(EvalError::Invalid(message.clone())))
                    .collect();
            }
        };
        if self.concurrency == 0 {
            return prompts
                .iter()
                .map(|_| Err(self.error(&url, "concurrency must be at least 1".into())))
                .collect();
        }
        let agent = self.agent(&url);
        let next = AtomicUsize::new(0);
        // The first error every later request would hit too: the prompts not sent yet fail
        // with it at once.
        let fatal: Mutex<Option<String>> = Mutex::new(None);
        let results: Vec<Mutex<Option<Result<String, EvalError>>>> =
            prompts.iter().map(|_| Mutex::new(None)).collect();
        let workers = self.concurrency.min(prompts.len());
        std::thread::scope(|scope| {
            for _ in 0..workers {
                scope.spawn(|| loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    let Some(prompt) = prompts.get(i) else { break };
                    let earlier = fatal.lock().unwrap_or_else(|e| e.into_inner()).clone();
                    let result = match earlier {
                        Some(message) => Err(self.error(
                            &url,
                            format!("not sent: an earlier request failed: {message}"),
                        )),
                        None => self.complete(&agent, &url, prompt, params).map_err(|f| {
                            if f.fatal {
                                let mut slot = fatal.lock().unwrap_or_else(|e| e.into_inner());
                                slot.get_or_insert_with(|| f.message.clone());
                            }
                            self.error(&url, f.message)
                        }),
                    };
                    *results[i].lock().unwrap_or_else(|e| e.into_inner()) = Some(result);
                });
            }
        });
        results
            .into_iter()
            .map(|slot| {
                slot.into_inner()
                    .unwrap_or_else(|e| e.into_inner())
                    .unwrap_or_else(|| Err(EvalError::Generation("prompt was not run".into())))
            })
            .collect()
    }
}

/// The system's CA bundle (read once): `$SSL_CERT_FILE`, else the Debian/Ubuntu or
/// Fedora/RHEL path; `None` (Mozilla's built-in roots) when none is readable or has no
/// certificate.
fn system_root_certs() -> Option<&'static ureq::tls::RootCerts> {
    static ROOTS: OnceLock<Option<ureq::tls::RootCerts>> = OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let candidates = std::env::var_os("SSL_CERT_FILE")
                .map(std::path::PathBuf::from)
                .into_iter()
                .chain(
                    [
                        "/etc/ssl/certs/ca-certificates.crt",
                        "/etc/pki/tls/certs/ca-bundle.crt",
                    ]
                    .map(std::path::PathBuf::from),
                );
            candidates.into_iter().find_map(|path| {
                let pem = std::fs::read(path).ok()?;
                let certs: Vec<_> = ureq::tls::parse_pem(&pem)
                    .filter_map(|item| match item {
                        Ok(ureq::tls::PemItem::Certificate(c)) => Some(c),
                        _ => None,
                    })
                    .collect();
                (!certs.is_empty()).then(|| ureq::tls::RootCerts::new_with_certs(&certs))
            })
        })
        .as_ref()
}

fn is_loopback(url: &str) -> bool {
    let host = url
        .split_once("://")
        .map_or(url, |(_, rest)| rest)
        .split('/')
        .next()
        .unwrap_or("");
    let host = host.rsplit_once('@').map_or(host, |(_, h)| h);
    let host = if host.starts_with('[') {
        host.split(']').next().unwrap_or("").trim_start_matches('[')
    } else {
        host.split(':').next().unwrap_or("")
    };
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// At most [`EXCERPT_CHARS`] characters of `body`, whitespace runs collapsed.
fn excerpt(body: &str) -> String {
    let collapsed = body.split_whitespace().collect::<Vec<_>>().join(" ");
    if collapsed.is_empty() {
        return "(empty body)".into();
    }
    match collapsed.char_indices().nth(EXCERPT_CHARS) {
        Some((cut, _)) => format!("{}…", &collapsed[..cut]),
        None => collapsed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::TestServer;
    use std::time::Instant;

    fn endpoint(server: &TestServer) -> Endpoint {
        Endpoint {
            timeout: Duration::from_secs(10),
            retries: 3,
            concurrency: 4,
            backoff: Duration::from_millis(10),
            ..Endpoint::new(&server.url(), "tiny-lora")
        }
    }

    fn params() -> GenerationParams {
        GenerationParams {
            max_new_tokens: 64,
            temperature: 0.2,
            top_p: 0.9,
            stop: vec!["\ndef ".into()],
            seed: 7,
        }
    }

    #[test]
    fn sends_the_openai_fields_and_reads_choices_text() {
        let server = TestServer::start_with(|r| format!("    return {}\ndef next():", r.prompt));
        server.expect_model("tiny-lora");
        server.expect_api_key("k-123");
        let ep = Endpoint {
            api_key: Some("k-123".into()),
            ..endpoint(&server)
        };
        let out = ep.generate("def f():\n", &params()).unwrap();
        // Cut before the stop sequence, like the built-in sampler.
        assert_eq!(out, "    return def f():\n");
        let reqs = server.requests();
        assert_eq!(reqs.len(), 1);
        let r = &reqs[0];
        assert_eq!(
            (r.method.as_str(), r.path.as_str(), r.status),
            ("POST", "/v1/completions", 200)
        );
        assert_eq!(r.header("authorization"), Some("Bearer k-123"));
        let c = r.completion.as_ref().unwrap();
        assert_eq!(c.model, "tiny-lora");
        assert_eq!(c.prompt, "def f():\n");
        assert_eq!(c.max_tokens, 64);
        assert_eq!((c.temperature, c.top_p, c.seed), (0.2, 0.9, Some(7)));
        assert_eq!(c.stop, ["\ndef "]);
        assert!(ep.describe().contains("model=tiny-lora"));
    }

    #[test]
    fn base_urls_with_v1_or_a_slash_reach_the_same_path() {
        let server = TestServer::start();
        for base in [
            server.url(),
            format!("{}/", server.url()),
            format!("{}/v1/", server.url()),
        ] {
            let ep = Endpoint {
                base_url: base.clone(),
                ..endpoint(&server)
            };
            assert_eq!(
                ep.generate("x", &params()).unwrap(),
                "completion of x",
                "{base}"
            );
        }
        assert!(server
            .requests()
            .iter()
            .all(|r| r.path == "/v1/completions"));
    }

    #[test]
    fn unsupported_urls_are_refused_by_name() {
        for url in ["127.0.0.1:8000", "ftp://h:1", "http://", "http:///v1"] {
            let e = Endpoint::new(url, "m")
                .generate("x", &params())
                .unwrap_err();
            let msg = e.to_string();
            assert!(msg.starts_with(&format!("endpoint {url}:")), "{msg}");
        }
    }

    #[test]
    fn server_errors_are_retried_with_backoff() {
        let server = TestServer::start();
        server.fail_first(2, 500);
        let ep = endpoint(&server);
        assert_eq!(ep.generate("p", &params()).unwrap(), "completion of p");
        let statuses: Vec<u16> = server.requests().iter().map(|r| r.status).collect();
        assert_eq!(statuses, [500, 500, 200]);

        // 429 (with Retry-After: 0) and 503 are retried too.
        server.fail_first(1, 429);
        assert!(ep.generate("q", &params()).is_ok());
        server.fail_first(1, 503);
        assert!(ep.generate("r", &params()).is_ok());
        assert_eq!(server.requests().len(), 7);
    }

    #[test]
    fn backoff_doubles_between_tries() {
        let server = TestServer::start();
        server.fail_first(2, 500);
        let ep = Endpoint {
            backoff: Duration::from_millis(100),
            ..endpoint(&server)
        };
        let t = Instant::now();
        assert!(ep.generate("p", &params()).is_ok());
        // 100 ms, then 200 ms.
        assert!(
            t.elapsed() >= Duration::from_millis(300),
            "{:?}",
            t.elapsed()
        );
    }

    #[test]
    fn a_dropped_connection_is_retried() {
        let server = TestServer::start();
        server.drop_first(1);
        let ep = endpoint(&server);
        assert_eq!(ep.generate("p", &params()).unwrap(), "completion of p");
        let statuses: Vec<u16> = server.requests().iter().map(|r| r.status).collect();
        assert_eq!(statuses, [0, 200]);
    }

    #[test]
    fn retries_run_out_with_the_status_and_body_in_the_error() {
        let server = TestServer::start();
        server.always_status(Some(502));
        let ep = Endpoint {
            retries: 2,
            ..endpoint(&server)
        };
        let msg = ep.generate("p", &params()).unwrap_err().to_string();
        assert!(
            msg.contains(&format!("{}/v1/completions", server.url())),
            "{msg}"
        );
        assert!(
            msg.contains("HTTP 502") && msg.contains("told to answer 502"),
            "{msg}"
        );
        assert!(msg.contains("after 3 tries"), "{msg}");
        assert_eq!(server.requests().len(), 3);
    }

    #[test]
    fn client_errors_are_not_retried() {
        let server = TestServer::start();
        server.fail_first(1, 400);
        let ep = endpoint(&server);
        let msg = ep.generate("p", &params()).unwrap_err().to_string();
        assert!(msg.contains("HTTP 400") && !msg.contains("tries"), "{msg}");
        assert_eq!(server.requests().len(), 1);

        // An unknown model name: vLLM's 404, the name in the message.
        server.expect_model("other");
        let msg = ep.generate("p", &params()).unwrap_err().to_string();
        assert!(
            msg.contains("HTTP 404") && msg.contains("tiny-lora"),
            "{msg}"
        );
        assert_eq!(server.requests().len(), 2);
    }

    #[test]
    fn a_slow_answer_times_out_without_retrying() {
        let server = TestServer::start();
        server.set_delay(Duration::from_secs(3));
        let ep = Endpoint {
            timeout: Duration::from_millis(300),
            ..endpoint(&server)
        };
        let t = Instant::now();
        let msg = ep.generate("p", &params()).unwrap_err().to_string();
        assert!(msg.contains("timed out after 300ms"), "{msg}");
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    }

    #[test]
    fn an_unreachable_server_fails_every_prompt_quickly() {
        // Port 1 (tcpmux): nothing listens there, and no test server can be given it.
        let ep = Endpoint {
            retries: 2,
            concurrency: 2,
            backoff: Duration::from_millis(10),
            ..Endpoint::new("http://127.0.0.1:1", "m")
        };
        let prompts: Vec<String> = (0..20).map(|i| i.to_string()).collect();
        let t = Instant::now();
        let out = ep.generate_all(&prompts, &params());
        assert_eq!(out.len(), 20);
        let msgs: Vec<String> = out
            .iter()
            .map(|r| r.as_ref().unwrap_err().to_string())
            .collect();
        assert!(
            msgs[0].contains("connection failed") && msgs[0].contains("after 3 tries"),
            "{}",
            msgs[0]
        );
        assert!(
            msgs[19].contains("not sent: an earlier request failed"),
            "{}",
            msgs[19]
        );
        assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    }

    #[test]
    fn generate_all_keeps_order_and_bounds_concurrency() {
        let server = TestServer::start();
        server.set_delay(Duration::from_millis(100));
        let ep = Endpoint {
            concurrency: 3,
            ..endpoint(&server)
        };
        let prompts: Vec<String> = (0..12).map(|i| format!("p{i}")).collect();
        let t = Instant::now();
        let out = ep.generate_all(&prompts, &params());
        let elapsed = t.elapsed();
        let texts: Vec<String> = out.into_iter().map(Result::unwrap).collect();
        let expected: Vec<String> = prompts
            .iter()
            .map(|p| format!("completion of {p}"))
            .collect();
        assert_eq!(texts, expected);
        let max = server.max_in_flight();
        assert!((2..=3).contains(&max), "max in flight {max}");
        // 12 requests of 100 ms, 3 at a time: about 400 ms, far from the 1.2 s of one at a time.
        assert!(elapsed < Duration::from_millis(1000), "{elapsed:?}");

        let server = TestServer::start();
        server.set_delay(Duration::from_millis(30));
        let one = Endpoint {
            concurrency: 1,
            ..endpoint(&server)
        };
        assert!(one
            .generate_all(&prompts[..4], &params())
            .iter()
            .all(Result::is_ok));
        assert_eq!(server.max_in_flight(), 1);
    }

    #[test]
    fn one_bad_prompt_does_not_stop_the_others() {
        let server = TestServer::start();
        server.fail_first(1, 400);
        let ep = Endpoint {
            concurrency: 1,
            ..endpoint(&server)
        };
        let prompts: Vec<String> = (0..3).map(|i| format!("p{i}")).collect();
        let out = ep.generate_all(&prompts, &params());
        assert!(out[0]
            .as_ref()
            .unwrap_err()
            .to_string()
            .contains("HTTP 400"));
        assert_eq!(out[1].as_ref().unwrap(), "completion of p1");
        assert_eq!(out[2].as_ref().unwrap(), "completion of p2");

        // An unknown model fails every prompt: the first request's 404, the others not sent.
        server.expect_model("other");
        let out = ep.generate_all(&prompts, &params());
        assert!(out[0]
            .as_ref()
            .unwrap_err()
            .to_string()
            .contains("HTTP 404"));
        for r in &out[1..] {
            let msg = r.as_ref().unwrap_err().to_string();
            assert!(
                msg.contains("not sent: an earlier request failed: HTTP 404"),
                "{msg}"
            );
        }
        assert_eq!(server.requests().len(), 4);
    }

    #[test]
    fn excerpts_are_short_and_loopback_hosts_are_recognised() {
        let long = "x".repeat(1000);
        assert_eq!(excerpt(&long).chars().count(), EXCERPT_CHARS + 1);
        assert_eq!(excerpt(" a \n b "), "a b");
        assert_eq!(excerpt(""), "(empty body)");
        assert!(is_loopback("http://127.0.0.1:8000/v1/completions"));
        assert!(is_loopback("http://localhost/v1/completions"));
        assert!(is_loopback("http://[::1]:80/v1/completions"));
        assert!(!is_loopback("https://api.example.com/v1/completions"));
    }

    #[test]
    fn missing_fields_are_refused_by_the_test_server() {
        // The server checks requests the way vLLM does, so a client that forgot a field fails.
        let server = TestServer::start();
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        let url = format!("{}/v1/completions", server.url());
        let resp = agent
            .post(&url)
            .header("Content-Type", "application/json")
            .send(r#"{"model": "m", "max_tokens": 4}"#)
            .unwrap();
        assert_eq!(resp.status().as_u16(), 400);
        let body = resp.into_body().read_to_string().unwrap();
        assert!(body.contains("'prompt' must be a string"), "{body}");
    }
}
