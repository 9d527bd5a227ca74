//! The join exchange: a shim that has no certificate yet presents a join token once, over a
//! connection of its own (TLS, told apart from links by its ALPN protocol), and gets its
//! unit certificate back. One [`Kind::Join`] frame each way: the request, then a
//! [`Kind::Joined`] answer or a GoAway with the reason; then the connection closes.

use std::future::Future;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio_util::codec::FramedRead;

use crate::frame::{FrameCodec, Kind};
use crate::link::{read_frame, write_frame, LinkError};
use crate::proto::{limits, JoinAnswer, JoinRequest};

/// Largest join request or answer (JSON: a CSR, or two certificates).
const MAX_JOIN: usize = 64 * 1024;

/// Sends `req` over `io` and waits (up to `timeout`) for the answer.
pub async fn request<T>(
    io: T,
    req: &JoinRequest,
    timeout: Duration,
) -> Result<JoinAnswer, LinkError>
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let (r, mut w) = tokio::io::split(io);
    let payload = serde_json::to_vec(req).expect("join requests serialize");
    write_frame(&mut w, Kind::Join, 0, &payload).await?;
    let mut reader = FramedRead::new(r, FrameCodec);
    let f = read_frame(&mut reader, timeout).await?;
    match f.kind {
        Kind::Joined if f.payload.len() <= MAX_JOIN => serde_json::from_slice(&f.payload)
            .map_err(|e| LinkError::Handshake(format!("a malformed join answer: {e}"))),
        Kind::GoAway => Err(LinkError::Handshake(format!(
            "join refused: {}",
            String::from_utf8_lossy(&f.payload)
        ))),
        other => Err(LinkError::Handshake(format!(
            "expected a join answer, got a {other:?} frame of {} bytes",
            f.payload.len()
        ))),
    }
}

/// Reads one join request from `io` (up to `timeout`), lets `grant` answer it (a certificate,
/// or the reason it is refused, sent back), and closes. Returns the unit that joined.
pub async fn serve<T, F, Fut>(io: T, timeout: Duration, grant: F) -> Result<u32, LinkError>
where
    T: AsyncRead + AsyncWrite + Unpin,
    F: FnOnce(JoinRequest) -> Fut,
    Fut: Future<Output = Result<JoinAnswer, String>>,
{
    let (r, mut w) = tokio::io::split(io);
    let mut reader = FramedRead::new(r, FrameCodec);
    let f = read_frame(&mut reader, timeout).await?;
    let req = match f.kind {
        Kind::Join if f.payload.len() <= MAX_JOIN => {
            serde_json::from_slice::<JoinRequest>(&f.payload)
                .map_err(|e| format!("a malformed join request: {e}"))
        }
        Kind::Join => Err(format!(
            "a join request of {} bytes (at most {MAX_JOIN})",
            f.payload.len()
        )),
        other => Err(format!(
            "a join connection takes one join request, not a {other:?} frame"
        )),
    };
    let req = req.and_then(|r| {
        if r.unit == 0 || r.unit > limits::MAX_UNIT_ID {
            Err(format!(
                "unit id {} is out of range (1..={})",
                r.unit,
                limits::MAX_UNIT_ID
            ))
        } else {
            Ok(r)
        }
    });
    let unit = req.as_ref().map_or(0, |r| r.unit);
    let answer = match req {
        Ok(r) => grant(r).await,
        Err(e) => Err(e),
    };
    let result = match answer {
        Ok(a) => {
            let payload = serde_json::to_vec(&a).expect("join answers serialize");
            write_frame(&mut w, Kind::Joined, 0, &payload).await?;
            Ok(unit)
        }
        Err(why) => {
            let _ = write_frame(&mut w, Kind::GoAway, 0, why.as_bytes()).await;
            Err(LinkError::Handshake(why))
        }
    };
    let _ = w.shutdown().await;
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(unit: u32) -> JoinRequest {
        JoinRequest {
            unit,
            token: "t".into(),
            csr: "c".into(),
        }
    }

    #[tokio::test]
    async fn a_join_is_answered_or_refused_with_the_reason() {
        let t = Duration::from_secs(5);
        let (a, b) = tokio::io::duplex(4096);
        let server = tokio::spawn(serve(b, t, |r: JoinRequest| async move {
            Ok(JoinAnswer {
                cert: format!("cert of {}", r.unit),
                ca: "ca".into(),
            })
        }));
        let ans = request(a, &req(4), t).await.unwrap();
        assert_eq!(ans.cert, "cert of 4");
        assert_eq!(server.await.unwrap().unwrap(), 4);

        let (a, b) = tokio::io::duplex(4096);
        let server = tokio::spawn(serve(b, t, |_: JoinRequest| async {
            Err::<JoinAnswer, _>("the token expired".to_owned())
        }));
        let e = request(a, &req(4), t).await.unwrap_err();
        assert!(
            e.to_string().contains("join refused: the token expired"),
            "{e}"
        );
        assert!(server.await.unwrap().is_err());

        // An id out of range never reaches the grant.
        let (a, b) = tokio::io::duplex(4096);
        let server = tokio::spawn(serve(b, t, |r: JoinRequest| async move {
            panic!("unit {} was granted", r.unit);
            #[allow(unreachable_code)]
            Err::<JoinAnswer, String>(String::new())
        }));
        let e = request(a, &req(70_000), t).await.unwrap_err();
        assert!(
            e.to_string().contains("unit id 70000 is out of range"),
            "{e}"
        );
        assert!(server.await.unwrap().is_err());
    }
}
