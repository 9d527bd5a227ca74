//! What both sides of a link share: reading calls, writing answers, the errors' kinds
//! across the link, and the accept loop of link listeners.

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use spore_core::ControlError;
use spore_shim::{Answer, Call, Message, RemoteError, RemoteErrorKind};

/// The call a message carries.
pub(crate) fn parse_call(msg: &Message) -> Result<Call, RemoteError> {
    serde_json::from_slice(&msg.header)
        .map_err(|e| RemoteError::new(RemoteErrorKind::BadCall, format!("unreadable call: {e}")))
}

/// The message of an answer.
pub(crate) fn answer_message(answer: &Answer, body: Bytes) -> Message {
    Message {
        header: serde_json::to_vec(answer)
            .expect("answers serialize")
            .into(),
        body,
    }
}

/// A unit's error as the control plane reports it.
pub(crate) fn remote_to_control(e: RemoteError, unit: u32) -> ControlError {
    let msg = format!("unit {unit}: {}", e.message);
    match e.kind {
        RemoteErrorKind::NotFound => ControlError::NotFound(msg),
        RemoteErrorKind::InvalidParameter | RemoteErrorKind::NeedsCode => {
            ControlError::InvalidParameter(msg)
        }
        RemoteErrorKind::InvalidRequestContent => ControlError::InvalidRequestContent(msg),
        RemoteErrorKind::TooManyRequests => ControlError::Unavailable(msg),
        RemoteErrorKind::RequestTooLarge => ControlError::InvalidParameter(msg),
        RemoteErrorKind::Unavailable => ControlError::Unavailable(msg),
        RemoteErrorKind::Internal | RemoteErrorKind::BadCall => ControlError::Internal(msg),
    }
}

/// A control-plane error as a unit sends it over its link.
pub(crate) fn control_to_remote(e: ControlError) -> RemoteError {
    let kind = match &e {
        ControlError::NotFound(_) => RemoteErrorKind::NotFound,
        ControlError::Conflict(_)
        | ControlError::InUse(_)
        | ControlError::InvalidParameter(_)
        | ControlError::ResourceConflict(_)
        | ControlError::PreconditionFailed(_) => RemoteErrorKind::InvalidParameter,
        ControlError::InvalidRequestContent(_) => RemoteErrorKind::InvalidRequestContent,
        ControlError::RequestTooLarge { .. } => RemoteErrorKind::RequestTooLarge,
        ControlError::TooManyRequests(_) => RemoteErrorKind::TooManyRequests,
        ControlError::Unavailable(_) => RemoteErrorKind::Unavailable,
        ControlError::Internal(_) => RemoteErrorKind::Internal,
    };
    RemoteError::new(kind, e.to_string())
}

/// Accepts connections on `listener` until the task is dropped (`what` names them in logs),
/// each with Nagle off, and serves each on a task of its own.
pub(crate) async fn accept_each<F, Fut>(listener: tokio::net::TcpListener, what: &str, serve: F)
where
    F: Fn(tokio::net::TcpStream, std::net::SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "accepting {what}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(serve(stream, peer));
    }
}
