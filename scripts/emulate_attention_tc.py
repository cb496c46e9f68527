#!/usr/bin/env python3
# emulate_attention_tc.py: the tiling of kernels/attention.cu's tensor-core kernels (64-row
# blocks, 64-key / 64-query tiles, the two-pass forward, dq per query block, dk/dv per key block
# over the queries that see it, document masks and cached keys) replayed block by block in
# float64 numpy, against a dense masked reference. It checks the kernels' loop bounds and masks
# without a GPU (not the WMMA calls or the bf16 rounding: the GPU test does that).
#
#   ~/.venv-ref/bin/python scripts/emulate_attention_tc.py    (prints max |diff| per case)
import numpy as np
R=64; TILE=64
def visible(i,j,past,ds):
    if j<past: return True
    jj=j-past
    return jj<=i and jj>=ds[i]
def doc_ends(ds):
    t=len(ds); de=[0]*t
    for i in reversed(range(t)):
        de[i]= de[i+1] if i+1<t and ds[i+1]==ds[i] else i
    return de
def fwd(q,k,v,ds,past,scale):
    t,h,d=q.shape; g,s,_=k.shape; grp=h//g
    o=np.zeros((t,h,d)); lse=np.zeros((t,h))
    for head in range(h):
        kvh=head//grp
        for i0 in range(0,t,R):
            rows=min(R,t-i0)
            jb=0 if past>0 else ds[i0]; je=past+i0+rows
            m=np.full(R,-np.inf); l=np.zeros(R)
            for j0 in range(jb,je,TILE):
                nk=min(TILE,s-j0)
                K=np.zeros((TILE,d)); K[:nk]=k[kvh,j0:j0+nk]
                Q=np.zeros((R,d)); Q[:rows]=q[i0:i0+rows,head]
                S=Q@K.T
                for wr in range(R):
                    ok=[wr<rows and j0+c<je and visible(i0+wr,j0+c,past,ds) for c in range(TILE)]
                    vals=[S[wr,c]*scale for c in range(TILE) if ok[c]]
                    tmax=max(vals) if vals else -np.inf
                    mn=max(m[wr],tmax)
                    sm=sum(np.exp(S[wr,c]*scale-mn) for c in range(TILE) if ok[c])
                    l[wr]=(0 if m[wr]==-np.inf else l[wr]*np.exp(m[wr]-mn))+sm
                    m[wr]=mn
            rl=np.where(l>0,m+np.log(np.where(l>0,l,1)),0)
            acc=np.zeros((R,d))
            for j0 in range(jb,je,TILE):
                nk=min(TILE,s-j0)
                K=np.zeros((TILE,d)); K[:nk]=k[kvh,j0:j0+nk]
                V=np.zeros((TILE,d)); V[:nk]=v[kvh,j0:j0+nk]
                Q=np.zeros((R,d)); Q[:rows]=q[i0:i0+rows,head]
                S=Q@K.T
                P=np.zeros((R,TILE))
                for wr in range(R):
                    for c in range(TILE):
                        if wr<rows and j0+c<je and visible(i0+wr,j0+c,past,ds):
                            P[wr,c]=np.exp(S[wr,c]*scale-rl[wr])
                acc+=P@V
            o[i0:i0+rows,head]=acc[:rows]; lse[i0:i0+rows,head]=rl[:rows]
    return o,lse
def bwd(q,k,v,o,do,lse,ds,past,scale):
    t,h,d=q.shape; g,s,_=k.shape; grp=h//g
    D=(do*o).sum(-1)
    dq=np.zeros_like(q); dk=np.zeros_like(k); dv=np.zeros_like(v)
    for head in range(h):
        kvh=head//grp
        for i0 in range(0,t,R):
            rows=min(R,t-i0); jb=0 if past>0 else ds[i0]; je=past+i0+rows
            Q=np.zeros((R,d)); Q[:rows]=q[i0:i0+rows,head]
            DO=np.zeros((R,d)); DO[:rows]=do[i0:i0+rows,head]
            acc=np.zeros((R,d))
            for j0 in range(jb,je,TILE):
                nk=min(TILE,s-j0)
                K=np.zeros((TILE,d)); K[:nk]=k[kvh,j0:j0+nk]
                V=np.zeros((TILE,d)); V[:nk]=v[kvh,j0:j0+nk]
                S=Q@K.T; dP=DO@V.T; dS=np.zeros((R,TILE))
                for wr in range(rows):
                    for c in range(TILE):
                        if j0+c<je and visible(i0+wr,j0+c,past,ds):
                            p=np.exp(S[wr,c]*scale-lse[i0+wr,head]); dS[wr,c]=p*(dP[wr,c]-D[i0+wr,head])
                acc+=dS@K
            dq[i0:i0+rows,head]=acc[:rows]*scale
    de=doc_ends(ds)
    for kvh in range(g):
        for j0 in range(0,s,R):
            nk=min(R,s-j0)
            K=np.zeros((R,d)); K[:nk]=k[kvh,j0:j0+nk]; V=np.zeros((R,d)); V[:nk]=v[kvh,j0:j0+nk]
            ak=np.zeros((R,d)); av=np.zeros((R,d))
            jl=j0+nk-1; ib=0 if j0<past else j0-past; ie=t if j0<past else de[jl-past]+1
            for head in range(kvh*grp,(kvh+1)*grp):
                for i0 in range(ib,ie,TILE):
                    rows=min(TILE,t-i0)
                    Q=np.zeros((TILE,d)); Q[:rows]=q[i0:i0+rows,head]
                    DO=np.zeros((TILE,d)); DO[:rows]=do[i0:i0+rows,head]
                    ls=np.zeros(TILE); ls[:rows]=lse[i0:i0+rows,head]
                    dr=np.zeros(TILE); dr[:rows]=D[i0:i0+rows,head]
                    ST=K@Q.T; dPT=V@DO.T
                    PT=np.zeros((R,TILE)); DST=np.zeros((R,TILE))
                    for wc in range(nk):
                        for r in range(rows):
                            if visible(i0+r,j0+wc,past,ds):
                                p=np.exp(ST[wc,r]*scale-ls[r]); PT[wc,r]=p; DST[wc,r]=p*(dPT[wc,r]-dr[r])
                    av+=PT@DO; ak+=DST@Q
            dk[kvh,j0:j0+nk]=ak[:nk]*scale; dv[kvh,j0:j0+nk]=av[:nk]
    return dq,dk,dv
def reference(q,k,v,do,ds,past,scale):
    t,h,d=q.shape; g,s,_=k.shape; grp=h//g
    o=np.zeros_like(q); dq=np.zeros_like(q); dk=np.zeros_like(k); dv=np.zeros_like(v)
    for head in range(h):
        kvh=head//grp
        S=q[:,head]@k[kvh].T*scale
        M=np.array([[visible(i,j,past,ds) for j in range(s)] for i in range(t)])
        S=np.where(M,S,-np.inf); P=np.exp(S-S.max(1,keepdims=True)); P/=P.sum(1,keepdims=True)
        o[:,head]=P@v[kvh]
        dP=do[:,head]@v[kvh].T; dS=P*(dP-(dP*P).sum(1,keepdims=True))
        dq[:,head]=dS@k[kvh]*scale; dk[kvh]+=dS.T@q[:,head]*scale; dv[kvh]+=P.T@do[:,head]
    return o,dq,dk,dv
rng=np.random.default_rng(0)
for docs,past in [([(0,20),(20,1),(21,30),(51,19)],0),([(0,20),(20,1),(21,30),(51,19)],5),([(0,60),(60,1),(61,89)],0),([(0,60),(60,1),(61,89)],5)]:
    ds=[]
    for st,ln in docs: ds+= [st]*ln
    t=len(ds); h,g,d=4,2,16
    q=rng.standard_normal((t,h,d)); k=rng.standard_normal((g,past+t,d)); v=rng.standard_normal((g,past+t,d)); do=rng.standard_normal((t,h,d))
    scale=d**-0.5
    o,lse=fwd(q,k,v,ds,past,scale); dq,dk,dv=bwd(q,k,v,o,do,lse,ds,past,scale)
    ro,rdq,rdk,rdv=reference(q,k,v,do,ds,past,scale)
    diffs=[float(np.abs(a-b).max()) for a,b in [(o,ro),(dq,rdq),(dk,rdk),(dv,rdv)]]
    print(f"T {t} past {past}: max |diff| o {diffs[0]:.1e} dq {diffs[1]:.1e} dk {diffs[2]:.1e} dv {diffs[3]:.1e}")
    assert max(diffs) < 1e-9, diffs
