//! A small OpenAI-compatible completions server for tests (this crate's, and other crates'
//! through the `test-server` feature): `POST /v1/completions` on 127.0.0.1, one thread per
//! connection, minimal HTTP/1.1 (`Content-Length` or chunked bodies, `Connection: close`).
//!
//! It checks the request like vLLM would (400 with an OpenAI-style error body when a field is
//! missing or has the wrong type, 404 for another model than the expected one, 401 without the
//! expected API key), answers with `choices[0].text` from a responder function, and can be told
//! to fail the first N requests, to answer every request with a given status, or to sleep
//! before answering. It records every request and the largest number of requests it was
//! handling at once.
//!
//! ```ignore
//! use finetune_eval::testing::TestServer;
//! let server = TestServer::start_with(|req| format!("    return {}\n", req.prompt.len()));
//! server.fail_first(2, 500);
//! let url = server.url(); // "http://127.0.0.1:PORT"
//! ```

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::{json, Value};

/// The fields of a completion request, as the server parsed them.
#[derive(Debug, Clone, PartialEq)]
pub struct CompletionRequest {
    pub model: String,
    pub prompt: String,
    pub max_tokens: u64,
    pub temperature: f64,
    pub top_p: f64,
    pub stop: Vec<String>,
    pub seed: Option<u64>,
}

/// One request the server received, and the status it answered.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    pub method: String,
    pub path: String,
    /// Header names in lower case.
    pub headers: Vec<(String, String)>,
    pub body: String,
    /// `None` when the body was not a valid completion request.
    pub completion: Option<CompletionRequest>,
    pub status: u16,
}

impl RecordedRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }
}

type Responder = dyn Fn(&CompletionRequest) -> String + Send + Sync;

struct Behaviour {
    /// The next `fail_remaining` requests are answered with `fail_status`.
    fail_remaining: usize,
    fail_status: u16,
    /// The next `drop_remaining` requests get no answer: the connection is closed.
    drop_remaining: usize,
    /// Every request answered with this status (after the checks).
    always_status: Option<u16>,
    delay: Duration,
    expect_model: Option<String>,
    expect_api_key: Option<String>,
}

struct State {
    behaviour: Mutex<Behaviour>,
    responder: Box<Responder>,
    requests: Mutex<Vec<RecordedRequest>>,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
}

/// The server; it stops accepting when dropped.
pub struct TestServer {
    addr: SocketAddr,
    state: Arc<State>,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking handler thread must not take the other tests' assertions down with it.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl TestServer {
    /// A server whose completion is `"completion of <prompt>"`.
    pub fn start() -> Self {
        Self::start_with(|req| format!("completion of {}", req.prompt))
    }

    /// A server whose completion of each request is `responder(request)`.
    pub fn start_with(
        responder: impl Fn(&CompletionRequest) -> String + Send + Sync + 'static,
    ) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("test server: bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("test server: local address");
        let state = Arc::new(State {
            behaviour: Mutex::new(Behaviour {
                fail_remaining: 0,
                fail_status: 500,
                drop_remaining: 0,
                always_status: None,
                delay: Duration::ZERO,
                expect_model: None,
                expect_api_key: None,
            }),
            responder: Box::new(responder),
            requests: Mutex::new(Vec::new()),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
        });
        let stop = Arc::new(AtomicBool::new(false));
        let accept = {
            let (state, stop) = (state.clone(), stop.clone());
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(stream) = stream else { continue };
                    let state = state.clone();
                    std::thread::spawn(move || handle(stream, &state));
                }
            })
        };
        Self {
            addr,
            state,
            stop,
            accept: Some(accept),
        }
    }

    /// `http://127.0.0.1:PORT` (no trailing slash, no `/v1`).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Answers the next `n` requests with `status` (and an error body; `Retry-After: 0` with
    /// 429) instead of a completion.
    pub fn fail_first(&self, n: usize, status: u16) {
        let mut b = lock(&self.state.behaviour);
        b.fail_remaining = n;
        b.fail_status = status;
    }

    /// Closes the connection of the next `n` requests without answering (recorded with
    /// status 0), like a server that crashed or restarted.
    pub fn drop_first(&self, n: usize) {
        lock(&self.state.behaviour).drop_remaining = n;
    }

    /// Answers every request with `status` (`None`: back to normal).
    pub fn always_status(&self, status: Option<u16>) {
        lock(&self.state.behaviour).always_status = status;
    }

    /// Sleeps this long before answering each request.
    pub fn set_delay(&self, delay: Duration) {
        lock(&self.state.behaviour).delay = delay;
    }

    /// Requests for another model get vLLM's 404 "model does not exist".
    pub fn expect_model(&self, model: &str) {
        lock(&self.state.behaviour).expect_model = Some(model.into());
    }

    /// Requests without `Authorization: Bearer <key>` get 401.
    pub fn expect_api_key(&self, key: &str) {
        lock(&self.state.behaviour).expect_api_key = Some(key.into());
    }

    /// Every request received so far, in the order they were answered.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        lock(&self.state.requests).clone()
    }

    /// The largest number of requests being handled at the same time so far.
    pub fn max_in_flight(&self) -> usize {
        self.state.max_in_flight.load(Ordering::SeqCst)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop up so that it sees the flag.
        let _ = TcpStream::connect(self.addr);
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
    }
}

struct RawRequest {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: String,
}

fn read_request(stream: &TcpStream) -> Option<RawRequest> {
    let mut r = BufReader::new(stream);
    let mut line = String::new();
    r.read_line(&mut line).ok()?;
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_string();
    let path = parts.next()?.to_string();
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).ok()? == 0 {
            return None;
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (k, v) = h.split_once(':')?;
        headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
    }
    let get = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    let mut body = Vec::new();
    if get("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        loop {
            let mut size = String::new();
            r.read_line(&mut size).ok()?;
            let size = usize::from_str_radix(size.trim().split(';').next()?, 16).ok()?;
            let mut chunk = vec![0; size + 2];
            r.read_exact(&mut chunk).ok()?;
            if size == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..size]);
        }
    } else if let Some(len) = get("content-length") {
        let len: usize = len.parse().ok()?;
        body.resize(len, 0);
        r.read_exact(&mut body).ok()?;
    }
    Some(RawRequest {
        method,
        path,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// Parses and checks a completion request body; the error is the 400 message.
fn parse_completion(body: &str) -> Result<CompletionRequest, String> {
    let v: Value = serde_json::from_str(body).map_err(|e| format!("body is not JSON: {e}"))?;
    let str_field = |k: &str| {
        v.get(k)
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| format!("'{k}' must be a string"))
    };
    let num_field = |k: &str, default: f64| match v.get(k) {
        None => Ok(default),
        Some(x) => x.as_f64().ok_or_else(|| format!("'{k}' must be a number")),
    };
    let max_tokens = v
        .get("max_tokens")
        .and_then(Value::as_u64)
        .ok_or("'max_tokens' must be a non-negative integer")?;
    let stop = match v.get("stop") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .map(|s| s.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or("'stop' must be a string or a list of strings")?,
        Some(_) => return Err("'stop' must be a string or a list of strings".into()),
    };
    let seed = match v.get("seed") {
        None | Some(Value::Null) => None,
        Some(s) => Some(s.as_u64().ok_or("'seed' must be an integer")?),
    };
    Ok(CompletionRequest {
        model: str_field("model")?,
        prompt: str_field("prompt")?,
        max_tokens,
        temperature: num_field("temperature", 1.0)?,
        top_p: num_field("top_p", 1.0)?,
        stop,
        seed,
    })
}

fn error_body(message: &str, kind: &str, code: u16) -> String {
    json!({"object": "error", "message": message, "type": kind, "code": code}).to_string()
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

fn handle(mut stream: TcpStream, state: &State) {
    let Some(req) = read_request(&stream) else {
        return;
    };
    let dropped = {
        let mut b = lock(&state.behaviour);
        let d = b.drop_remaining > 0;
        b.drop_remaining = b.drop_remaining.saturating_sub(1);
        d
    };
    if dropped {
        lock(&state.requests).push(RecordedRequest {
            method: req.method,
            path: req.path,
            headers: req.headers,
            completion: parse_completion(&req.body).ok(),
            body: req.body,
            status: 0,
        });
        let _ = stream.shutdown(std::net::Shutdown::Both);
        return;
    }
    let now = state.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    state.max_in_flight.fetch_max(now, Ordering::SeqCst);

    let (status, body, completion) = answer(&req, state);

    let mut response = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n",
        reason(status),
        body.len()
    );
    if status == 429 {
        response.push_str("Retry-After: 0\r\n");
    }
    response.push_str("\r\n");
    response.push_str(&body);
    lock(&state.requests).push(RecordedRequest {
        method: req.method,
        path: req.path,
        headers: req.headers,
        body: req.body,
        completion,
        status,
    });
    state.in_flight.fetch_sub(1, Ordering::SeqCst);
    // The client may have given up (timeout): nothing to do about a failed write.
    let _ = stream.write_all(response.as_bytes());
    let _ = stream.flush();
}

fn answer(req: &RawRequest, state: &State) -> (u16, String, Option<CompletionRequest>) {
    let (delay, fail, always, expect_model, expect_key) = {
        let mut b = lock(&state.behaviour);
        let fail = (b.fail_remaining > 0).then(|| {
            b.fail_remaining -= 1;
            b.fail_status
        });
        (
            b.delay,
            fail,
            b.always_status,
            b.expect_model.clone(),
            b.expect_api_key.clone(),
        )
    };
    std::thread::sleep(delay);

    if req.path != "/v1/completions" {
        return (404, error_body("no such route", "NotFoundError", 404), None);
    }
    if req.method != "POST" {
        return (
            405,
            error_body("method not allowed", "BadRequestError", 405),
            None,
        );
    }
    let header = |name: &str| {
        req.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    if let Some(key) = expect_key {
        if header("authorization") != Some(&format!("Bearer {key}")) {
            return (
                401,
                error_body("invalid API key", "AuthenticationError", 401),
                None,
            );
        }
    }
    if !header("content-type").is_some_and(|v| v.starts_with("application/json")) {
        let msg = "Content-Type must be application/json";
        return (400, error_body(msg, "BadRequestError", 400), None);
    }
    let completion = match parse_completion(&req.body) {
        Ok(c) => c,
        Err(msg) => return (400, error_body(&msg, "BadRequestError", 400), None),
    };
    if let Some(model) = expect_model {
        if completion.model != model {
            let msg = format!("The model `{}` does not exist.", completion.model);
            return (
                404,
                error_body(&msg, "NotFoundError", 404),
                Some(completion),
            );
        }
    }
    if let Some(status) = fail.or(always) {
        let msg = format!("test server told to answer {status}");
        return (
            status,
            error_body(&msg, "TestError", status),
            Some(completion),
        );
    }
    let text = (state.responder)(&completion);
    let n = state.requests.lock().map(|r| r.len()).unwrap_or(0);
    let body = json!({
        "id": format!("cmpl-test-{n}"),
        "object": "text_completion",
        "created": 0,
        "model": completion.model,
        "choices": [{"index": 0, "text": text, "logprobs": null, "finish_reason": "stop"}],
        "usage": {
            "prompt_tokens": completion.prompt.len(),
            "completion_tokens": text.len(),
            "total_tokens": completion.prompt.len() + text.len()
        }
    });
    (200, body.to_string(), Some(completion))
}
