//! AWS Signature Version 4 (`AWS4-HMAC-SHA256` in the `Authorization` header), both sides:
//! [`sign`] adds the headers a client sends, [`verify`] recomputes the signature of a request
//! the way the client did and compares it.
//!
//! Written here rather than taken from a crate: the AWS SDK's `aws-sigv4` signs but decides
//! for itself which headers it signs, while a verifier must sign exactly the headers the
//! client listed in `SignedHeaders`; the algorithm is a few hashes over a canonical form of
//! the request (documented by AWS as "Create a canonical request for Signature Version 4").
//! Tests check it against requests signed by botocore itself.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use spore_registry::store::civil_from_days;

use crate::Credentials;

/// The region Spore's own clients sign for (the daemon accepts any region a client signed
/// for: the region names no separate endpoint here).
pub const DEFAULT_REGION: &str = "us-east-1";
/// The algorithm name in the `Authorization` header.
pub const ALGORITHM: &str = "AWS4-HMAC-SHA256";
/// How far a request's date may be from the server's clock (AWS allows 15 minutes).
pub const MAX_SKEW: Duration = Duration::from_secs(15 * 60);

/// What of a request takes part in its signature.
#[derive(Debug, Clone, Copy)]
pub struct RequestParts<'a> {
    /// `GET`, `POST`, ...
    pub method: &'a str,
    /// The path as sent (percent-encoded, not decoded).
    pub path: &'a str,
    /// The query string as sent, without `?` (empty if none).
    pub query: &'a str,
    /// The headers, names in any case (a name may repeat).
    pub headers: &'a [(String, String)],
    /// The body.
    pub body: &'a [u8],
}

/// Why a request's signature was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// The request carries no signature at all.
    #[error("Missing Authentication Token: sign requests with AWS Signature Version 4 (an access key from the daemon's credentials file, or `spore keys create`)")]
    Missing,
    /// The signature names an access key the daemon does not have.
    #[error("The security token included in the request is invalid.")]
    UnknownKey,
    /// The `Authorization` header or a signed part is malformed.
    #[error("{0}")]
    Malformed(String),
    /// The request's date is too far from the daemon's clock.
    #[error("Signature expired: {request} is now earlier than {earliest} ({now} - 15 min.)")]
    Expired {
        /// The request's date.
        request: String,
        /// The earliest date accepted.
        earliest: String,
        /// The daemon's clock.
        now: String,
    },
    /// The date is later than the daemon's clock allows.
    #[error("Signature not yet current: {request} is still later than {latest} ({now} + 15 min.)")]
    NotYetCurrent {
        /// The request's date.
        request: String,
        /// The latest date accepted.
        latest: String,
        /// The daemon's clock.
        now: String,
    },
    /// The signature does not match.
    #[error("The request signature we calculated does not match the signature you provided. Check your AWS Secret Access Key and signing method. Consult the service documentation for details.")]
    Mismatch,
}

/// A request whose signature checked out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// The access key that signed it.
    pub access_key_id: String,
    /// The region it was signed for.
    pub region: String,
    /// The service it was signed for.
    pub service: String,
}

/// The headers a client adds to sign a request for `service` in `region` at `now`:
/// `x-amz-date` and `authorization`. `parts.headers` must hold the `host` header as it
/// will be sent (clients that add it when sending still have to list it here).
pub fn sign(
    parts: &RequestParts<'_>,
    creds: &Credentials,
    region: &str,
    service: &str,
    now: SystemTime,
) -> Vec<(String, String)> {
    let date = amz_date(now);
    let mut headers: Vec<(String, String)> = parts
        .headers
        .iter()
        .filter(|(n, _)| !n.eq_ignore_ascii_case("authorization"))
        .filter(|(n, _)| !n.eq_ignore_ascii_case("x-amz-date"))
        .cloned()
        .collect();
    headers.push(("x-amz-date".into(), date.clone()));
    // Sign the host, the date and every x-amz-* and content-type header present.
    let mut names: Vec<String> = headers
        .iter()
        .map(|(n, _)| n.to_ascii_lowercase())
        .filter(|n| n == "host" || n == "content-type" || n.starts_with("x-amz-"))
        .collect();
    names.sort();
    names.dedup();
    let signed = names.join(";");
    let scope = format!("{}/{region}/{service}/aws4_request", &date[..8]);
    let with_date = RequestParts {
        headers: &headers,
        ..*parts
    };
    let signature = signature(
        &with_date,
        &names,
        &date,
        &scope,
        &creds.secret_access_key,
        region,
        service,
        &payload_hash(&with_date),
    );
    vec![
        ("x-amz-date".into(), date),
        (
            "authorization".into(),
            format!(
                "{ALGORITHM} Credential={}/{scope}, SignedHeaders={signed}, Signature={signature}",
                creds.access_key_id
            ),
        ),
    ]
}

/// The headers that sign a request to `url` (its full address, as it will be sent: scheme,
/// host, port, path, query) for Spore's default region and service `lambda`: what a client
/// adds to its request. `headers` are the request's own (`host` is taken from the URL).
pub fn sign_request(
    method: &str,
    url: &str,
    headers: &[(String, String)],
    body: &[u8],
    creds: &Credentials,
    now: SystemTime,
) -> Vec<(String, String)> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let (authority, path_query) = rest.find('/').map_or((rest, "/"), |i| rest.split_at(i));
    let (path, query) = path_query.split_once('?').unwrap_or((path_query, ""));
    let query = query.split('#').next().unwrap_or_default();
    let mut all: Vec<(String, String)> = headers
        .iter()
        .filter(|(n, _)| !n.eq_ignore_ascii_case("host"))
        .cloned()
        .collect();
    all.push(("host".into(), authority.to_owned()));
    let parts = RequestParts {
        method,
        path,
        query,
        headers: &all,
        body,
    };
    sign(&parts, creds, DEFAULT_REGION, "lambda", now)
}

/// [`sign_request`] for a request built with the `http` types (what `reqwest` and `axum`
/// use): the headers to add, ready to insert.
pub fn sign_http(
    method: &http::Method,
    url: &str,
    headers: &http::HeaderMap,
    body: &[u8],
    creds: &Credentials,
    now: SystemTime,
) -> Vec<(http::HeaderName, http::HeaderValue)> {
    let own: Vec<(String, String)> = headers
        .iter()
        .map(|(n, v)| {
            (
                n.as_str().to_owned(),
                v.to_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    sign_request(method.as_str(), url, &own, body, creds, now)
        .into_iter()
        .filter_map(|(k, v)| {
            Some((
                http::HeaderName::from_bytes(k.as_bytes()).ok()?,
                http::HeaderValue::from_str(&v).ok()?,
            ))
        })
        .collect()
}

/// The access key id an `Authorization` header claims (None: not a SigV4 header), read
/// without checking anything else: lets a server refuse an unknown key before it reads the
/// request's body.
pub fn access_key_of(authorization: &str) -> Option<&str> {
    let rest = authorization.strip_prefix(ALGORITHM)?;
    let credential = rest
        .split(',')
        .find_map(|p| p.trim().strip_prefix("Credential="))?;
    credential.split('/').next().filter(|k| !k.is_empty())
}

/// Checks a request's signature: `secret_of` gives the secret of an access key id (None:
/// no such key). The date must be within [`MAX_SKEW`] of `now`.
pub fn verify(
    parts: &RequestParts<'_>,
    secret_of: impl Fn(&str) -> Option<String>,
    now: SystemTime,
) -> Result<Verified, SignatureError> {
    let auth = header(parts.headers, "authorization").ok_or_else(|| {
        if query_has(parts.query, "X-Amz-Signature") {
            SignatureError::Malformed(
                "presigned URLs (a signature in the query string) are not supported: sign the Authorization header".into(),
            )
        } else {
            SignatureError::Missing
        }
    })?;
    let auth = Authorization::parse(auth)?;
    let date = header(parts.headers, "x-amz-date")
        .ok_or_else(|| SignatureError::Malformed("the request has no X-Amz-Date header".into()))?;
    let when = parse_amz_date(date).ok_or_else(|| {
        SignatureError::Malformed(format!(
            "X-Amz-Date {date:?} is not a date of the form YYYYMMDDTHHMMSSZ"
        ))
    })?;
    if auth.date.as_bytes() != &date.as_bytes()[..8] {
        return Err(SignatureError::Malformed(format!(
            "the credential scope's date {} is not the date of X-Amz-Date {date}",
            auth.date
        )));
    }
    if when + MAX_SKEW < now {
        return Err(SignatureError::Expired {
            request: date.to_owned(),
            earliest: amz_date(now - MAX_SKEW),
            now: amz_date(now),
        });
    }
    if when > now + MAX_SKEW {
        return Err(SignatureError::NotYetCurrent {
            request: date.to_owned(),
            latest: amz_date(now + MAX_SKEW),
            now: amz_date(now),
        });
    }
    if !auth.signed.iter().any(|h| h == "host") {
        return Err(SignatureError::Malformed(
            "the host header must be signed".into(),
        ));
    }
    for name in &auth.signed {
        if header(parts.headers, name).is_none() {
            return Err(SignatureError::Malformed(format!(
                "the signed header {name} is not in the request"
            )));
        }
    }
    let secret = secret_of(&auth.key).ok_or(SignatureError::UnknownKey)?;
    let hash = payload_hash(parts);
    if let Some(claimed) = header(parts.headers, "x-amz-content-sha256") {
        if claimed != hash && claimed != "UNSIGNED-PAYLOAD" {
            return Err(SignatureError::Malformed(
                "x-amz-content-sha256 is not the SHA-256 of the body".into(),
            ));
        }
    }
    let scope = format!(
        "{}/{}/{}/aws4_request",
        auth.date, auth.region, auth.service
    );
    let expected = signature(
        parts,
        &auth.signed,
        date,
        &scope,
        &secret,
        &auth.region,
        &auth.service,
        &hash,
    );
    // Constant-time comparison, through the MAC type's own check.
    let mut mac = Hmac::<Sha256>::new_from_slice(b"spore-compare").expect("any key length");
    mac.update(expected.as_bytes());
    let want = mac.finalize().into_bytes();
    let mut mac = Hmac::<Sha256>::new_from_slice(b"spore-compare").expect("any key length");
    mac.update(auth.signature.as_bytes());
    if mac.verify_slice(&want).is_err() {
        return Err(SignatureError::Mismatch);
    }
    Ok(Verified {
        access_key_id: auth.key,
        region: auth.region,
        service: auth.service,
    })
}

/// The parsed `Authorization` header.
struct Authorization {
    key: String,
    date: String,
    region: String,
    service: String,
    signed: Vec<String>,
    signature: String,
}

impl Authorization {
    fn parse(value: &str) -> Result<Authorization, SignatureError> {
        let bad = |why: &str| SignatureError::Malformed(format!("Authorization header: {why}"));
        let rest = value
            .strip_prefix(ALGORITHM)
            .ok_or_else(|| bad(&format!("the algorithm must be {ALGORITHM}")))?;
        let (mut credential, mut signed, mut signature) = (None, None, None);
        for part in rest.split(',') {
            let part = part.trim();
            if let Some(v) = part.strip_prefix("Credential=") {
                credential = Some(v);
            } else if let Some(v) = part.strip_prefix("SignedHeaders=") {
                signed = Some(v);
            } else if let Some(v) = part.strip_prefix("Signature=") {
                signature = Some(v);
            }
        }
        let credential = credential.ok_or_else(|| bad("no Credential"))?;
        let signed = signed.ok_or_else(|| bad("no SignedHeaders"))?;
        let signature = signature.ok_or_else(|| bad("no Signature"))?;
        let c: Vec<&str> = credential.split('/').collect();
        if c.len() != 5 || c[4] != "aws4_request" || c.iter().any(|x| x.is_empty()) {
            return Err(bad(
                "Credential must be KEY/YYYYMMDD/REGION/SERVICE/aws4_request",
            ));
        }
        if c[1].len() != 8 || !c[1].bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad("the credential scope's date is not YYYYMMDD"));
        }
        if signature.len() != 64 || !signature.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad("Signature must be 64 hex digits"));
        }
        let signed: Vec<String> = signed.split(';').map(str::to_ascii_lowercase).collect();
        if signed.iter().any(String::is_empty) {
            return Err(bad("SignedHeaders has an empty name"));
        }
        Ok(Authorization {
            key: c[0].to_owned(),
            date: c[1].to_owned(),
            region: c[2].to_owned(),
            service: c[3].to_owned(),
            signed,
            signature: signature.to_ascii_lowercase(),
        })
    }
}

#[allow(clippy::too_many_arguments)]
fn signature(
    parts: &RequestParts<'_>,
    signed: &[String],
    date: &str,
    scope: &str,
    secret: &str,
    region: &str,
    service: &str,
    payload_hash: &str,
) -> String {
    let canonical = canonical_request(parts, signed, payload_hash);
    let to_sign = format!(
        "{ALGORITHM}\n{date}\n{scope}\n{}",
        hex::encode(Sha256::digest(canonical.as_bytes()))
    );
    let k_date = hmac(format!("AWS4{secret}").as_bytes(), &date.as_bytes()[..8]);
    let k_region = hmac(&k_date, region.as_bytes());
    let k_service = hmac(&k_region, service.as_bytes());
    let k_signing = hmac(&k_service, b"aws4_request");
    hex::encode(hmac(&k_signing, to_sign.as_bytes()))
}

fn hmac(key: &[u8], data: &[u8]) -> Vec<u8> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(data);
    mac.finalize().into_bytes().to_vec()
}

/// The hex SHA-256 of the body.
fn payload_hash(parts: &RequestParts<'_>) -> String {
    hex::encode(Sha256::digest(parts.body))
}

/// The canonical request (method, URI, query, headers, signed header names, payload hash).
fn canonical_request(parts: &RequestParts<'_>, signed: &[String], payload_hash: &str) -> String {
    let mut out = String::new();
    out.push_str(parts.method);
    out.push('\n');
    // Services other than S3 encode the path once more (the client encoded it to send it).
    let path = if parts.path.is_empty() {
        "/"
    } else {
        parts.path
    };
    out.push_str(&uri_encode(path, false));
    out.push('\n');
    out.push_str(&canonical_query(parts.query));
    out.push('\n');
    for name in signed {
        let values: Vec<String> = parts
            .headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect();
        out.push_str(name);
        out.push(':');
        out.push_str(&values.join(","));
        out.push('\n');
    }
    out.push('\n');
    out.push_str(&signed.join(";"));
    out.push('\n');
    out.push_str(payload_hash);
    out
}

/// Query parameters decoded, encoded strictly, and sorted by name then value.
fn canonical_query(query: &str) -> String {
    let mut pairs: Vec<(String, String)> = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (
                uri_encode(&percent_decode(k), true),
                uri_encode(&percent_decode(v), true),
            )
        })
        .collect();
    pairs.sort();
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&")
}

/// Percent-encodes every byte but the unreserved ones (and `/` unless `slash`).
fn uri_encode(s: &str, slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        let keep = b.is_ascii_alphanumeric()
            || matches!(b, b'-' | b'_' | b'.' | b'~')
            || (b == b'/' && !slash);
        if keep {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Decodes `%XX` escapes (a malformed escape is kept as it is).
pub fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let hex = |c: u8| (c as char).to_digit(16);
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn query_has(query: &str, name: &str) -> bool {
    query.split('&').any(|p| p.split('=').next() == Some(name))
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// `YYYYMMDDTHHMMSSZ` of `t` (UTC).
pub fn amz_date(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}{m:02}{d:02}T{:02}{:02}{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// The time of an `YYYYMMDDTHHMMSSZ` date.
pub fn parse_amz_date(s: &str) -> Option<SystemTime> {
    let b = s.as_bytes();
    if !s.is_ascii() || b.len() != 16 || b[8] != b'T' || b[15] != b'Z' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<u64> {
        let t = &s[r];
        t.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| t.parse().ok())?
    };
    let (y, mo, d) = (num(0..4)?, num(4..6)?, num(6..8)?);
    let (h, mi, se) = (num(9..11)?, num(11..13)?, num(13..15)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || se > 60 {
        return None;
    }
    let days = days_from_civil(y as i64, mo as u32, d as u32);
    let secs = u64::try_from(days).ok()? * 86_400 + h * 3600 + mi * 60 + se;
    Some(UNIX_EPOCH + Duration::from_secs(secs))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm; the
/// inverse of [`civil_from_days`]).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    fn creds() -> Credentials {
        Credentials {
            access_key_id: "AKIDEXAMPLE".into(),
            secret_access_key: "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY".into(),
        }
    }

    fn at(date: &str) -> SystemTime {
        parse_amz_date(date).unwrap()
    }

    #[test]
    fn dates_round_trip() {
        for s in [
            "19700101T000000Z",
            "20150830T123600Z",
            "20261206T235959Z",
            "20000229T120000Z",
        ] {
            assert_eq!(amz_date(at(s)), s);
        }
        assert!(parse_amz_date("20151330T123600Z").is_none());
        assert!(parse_amz_date("2015-08-30T12:36").is_none());
    }

    /// AWS's published example ("get-vanilla" of the SigV4 test suite).
    #[test]
    fn matches_the_aws_test_suite() {
        let headers = vec![
            ("Host".to_string(), "example.amazonaws.com".to_string()),
            ("X-Amz-Date".to_string(), "20150830T123600Z".to_string()),
        ];
        let parts = RequestParts {
            method: "GET",
            path: "/",
            query: "",
            headers: &headers,
            body: b"",
        };
        let signed = vec!["host".to_string(), "x-amz-date".to_string()];
        let scope = "20150830/us-east-1/service/aws4_request";
        let sig = signature(
            &parts,
            &signed,
            "20150830T123600Z",
            scope,
            &creds().secret_access_key,
            "us-east-1",
            "service",
            &payload_hash(&parts),
        );
        assert_eq!(
            sig,
            "5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31"
        );
    }

    fn signed_request(now: SystemTime, body: &'static [u8]) -> Vec<(String, String)> {
        let mut headers = vec![
            ("host".to_string(), "127.0.0.1:9000".to_string()),
            ("content-type".to_string(), "application/json".to_string()),
        ];
        let parts = RequestParts {
            method: "POST",
            path: "/2015-03-31/functions/arn%3Aaws%3Alambda%3Ax%3A1%3Afunction%3Ahello/invocations",
            query: "Qualifier=%24LATEST",
            headers: &headers,
            body,
        };
        headers.extend(sign(&parts, &creds(), "local", "lambda", now));
        headers
    }

    #[test]
    fn what_is_signed_verifies_and_nothing_else_does() {
        let now = at("20261206T120000Z");
        let headers = signed_request(now, b"{\"a\":1}");
        let parts = |h: &'static str, body: &'static [u8], hdrs: &'static [(String, String)]| {
            RequestParts {
            method: "POST",
            path: "/2015-03-31/functions/arn%3Aaws%3Alambda%3Ax%3A1%3Afunction%3Ahello/invocations",
            query: h,
            headers: hdrs,
            body,
        }
        };
        let hdrs: &'static [(String, String)] = Box::leak(headers.into_boxed_slice());
        let secret = |k: &str| (k == "AKIDEXAMPLE").then(|| creds().secret_access_key);
        let ok = verify(
            &parts("Qualifier=%24LATEST", b"{\"a\":1}", hdrs),
            secret,
            now,
        )
        .unwrap();
        assert_eq!(ok.access_key_id, "AKIDEXAMPLE");
        assert_eq!(
            (ok.region.as_str(), ok.service.as_str()),
            ("local", "lambda")
        );
        // Another body, another query, a wrong secret, an unknown key, a late clock.
        assert_eq!(
            verify(
                &parts("Qualifier=%24LATEST", b"{\"a\":2}", hdrs),
                secret,
                now
            ),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify(&parts("Qualifier=1", b"{\"a\":1}", hdrs), secret, now),
            Err(SignatureError::Mismatch)
        );
        let wrong = |_: &str| Some("not the secret".to_string());
        assert_eq!(
            verify(
                &parts("Qualifier=%24LATEST", b"{\"a\":1}", hdrs),
                wrong,
                now
            ),
            Err(SignatureError::Mismatch)
        );
        let none = |_: &str| None;
        assert_eq!(
            verify(&parts("Qualifier=%24LATEST", b"{\"a\":1}", hdrs), none, now),
            Err(SignatureError::UnknownKey)
        );
        let late = now + Duration::from_secs(16 * 60);
        assert!(matches!(
            verify(
                &parts("Qualifier=%24LATEST", b"{\"a\":1}", hdrs),
                secret,
                late
            ),
            Err(SignatureError::Expired { .. })
        ));
        let early = now - Duration::from_secs(16 * 60);
        assert!(matches!(
            verify(
                &parts("Qualifier=%24LATEST", b"{\"a\":1}", hdrs),
                secret,
                early
            ),
            Err(SignatureError::NotYetCurrent { .. })
        ));
    }

    #[test]
    fn a_url_signs_as_its_parts() {
        let now = at("20261206T120000Z");
        let url = "http://127.0.0.1:9000/2015-03-31/functions/f/invocations?Qualifier=1";
        let added = sign_request("POST", url, &[], b"{}", &creds(), now);
        let mut headers = vec![("host".to_string(), "127.0.0.1:9000".to_string())];
        headers.extend(added);
        let parts = RequestParts {
            method: "POST",
            path: "/2015-03-31/functions/f/invocations",
            query: "Qualifier=1",
            headers: &headers,
            body: b"{}",
        };
        let secret = |_: &str| Some(creds().secret_access_key);
        assert!(verify(&parts, secret, now).is_ok());
    }

    #[test]
    fn unsigned_and_malformed_requests_say_why() {
        let headers = vec![("host".to_string(), "h".to_string())];
        let parts = RequestParts {
            method: "GET",
            path: "/",
            query: "",
            headers: &headers,
            body: b"",
        };
        let any = |_: &str| Some(String::new());
        assert_eq!(
            verify(&parts, any, SystemTime::now()),
            Err(SignatureError::Missing)
        );
        let headers = vec![
            ("host".to_string(), "h".to_string()),
            (
                "authorization".to_string(),
                "Basic dXNlcjpwYXNz".to_string(),
            ),
        ];
        let parts = RequestParts {
            headers: &headers,
            ..parts
        };
        assert!(matches!(
            verify(&parts, any, SystemTime::now()),
            Err(SignatureError::Malformed(m)) if m.contains("AWS4-HMAC-SHA256")
        ));
    }

    proptest::proptest! {
        /// Arbitrary header values never make the verifier panic.
        #[test]
        fn arbitrary_authorization_headers_are_refused_cleanly(v in ".{0,300}") {
            let headers = vec![
                ("host".to_string(), "h".to_string()),
                ("x-amz-date".to_string(), "20261206T120000Z".to_string()),
                ("authorization".to_string(), format!("AWS4-HMAC-SHA256 {v}")),
            ];
            let parts = RequestParts { method: "GET", path: "/", query: &v, headers: &headers, body: b"" };
            let _ = verify(&parts, |_| Some("s".into()), at("20261206T120000Z"));
        }
    }
}
