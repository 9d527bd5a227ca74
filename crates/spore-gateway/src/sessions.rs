//! Dashboard sessions: a session cookie per login (in memory, 12 hours) and one-time login
//! tokens for `spore ui` (five minutes, one login each).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::http::{header, HeaderMap};

/// The session cookie's name.
pub const COOKIE: &str = "spore_session";
/// How long a session lasts.
pub(crate) const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// How long a one-time login URL works.
pub(crate) const LOGIN_URL_TTL: Duration = Duration::from_secs(300);

/// Dashboard sessions and one-time login tokens (in memory: a restart logs everyone out).
#[derive(Debug, Default)]
pub struct Sessions {
    /// Session token -> (key name, expiry).
    sessions: Mutex<HashMap<String, (String, Instant)>>,
    /// One-time login token -> (key name, expiry).
    once: Mutex<HashMap<String, (String, Instant)>>,
}

fn token() -> String {
    format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    )
}

impl Sessions {
    pub(crate) fn start(&self, key: &str) -> String {
        let t = token();
        let mut s = self.sessions.lock().expect("sessions lock");
        let now = Instant::now();
        s.retain(|_, (_, exp)| *exp > now);
        s.insert(t.clone(), (key.to_owned(), now + SESSION_TTL));
        t
    }

    /// The key name of a live session.
    pub fn key_of(&self, session: &str) -> Option<String> {
        let s = self.sessions.lock().expect("sessions lock");
        s.get(session)
            .filter(|(_, exp)| *exp > Instant::now())
            .map(|(k, _)| k.clone())
    }

    pub(crate) fn end(&self, session: &str) {
        self.sessions.lock().expect("sessions lock").remove(session);
    }

    pub(crate) fn one_time(&self, key: &str) -> String {
        let t = token();
        let mut o = self.once.lock().expect("login tokens lock");
        let now = Instant::now();
        o.retain(|_, (_, exp)| *exp > now);
        o.insert(t.clone(), (key.to_owned(), now + LOGIN_URL_TTL));
        t
    }

    pub(crate) fn redeem(&self, t: &str) -> Option<String> {
        let (key, exp) = self.once.lock().expect("login tokens lock").remove(t)?;
        (exp > Instant::now()).then_some(key)
    }
}

/// The session token in a request's cookies.
pub fn session_cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn one_time_tokens_work_once_and_sessions_are_found_by_cookie() {
        let s = Sessions::default();
        let t = s.one_time("admin");
        assert_eq!(s.redeem(&t).as_deref(), Some("admin"));
        assert!(s.redeem(&t).is_none(), "a login URL works once");
        let session = s.start("admin");
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_str(&format!("a=b; {COOKIE}={session}; c=d")).unwrap(),
        );
        assert_eq!(session_cookie(&h).as_deref(), Some(session.as_str()));
        assert_eq!(s.key_of(&session).as_deref(), Some("admin"));
        s.end(&session);
        assert!(s.key_of(&session).is_none());
    }
}
