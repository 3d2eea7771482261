//! The HTTP side of `keygate keys`: one hyper-util client for http and https
//! admin URLs (rustls with the webpki roots, as the proxy's upstream client),
//! the admin token in a sensitive `Authorization` header, and every failure
//! turned into one sentence naming the admin URL: connection refused, timeout,
//! TLS, or the API's own problem+json answer ([`CliError::Api`]).
//!
//! Nothing here prints; the caller decides what to show.

use std::error::Error as StdError;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use url::Url;

use super::{AdminToken, CliError};

/// How long establishing a connection (TCP and TLS) may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one call, from sending to the last byte of the answer, may take.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// The largest answer read (a page of 1000 keys with large metadata fits).
pub const MAX_ANSWER_BYTES: usize = 64 * 1024 * 1024;
/// Longest server text (a problem's detail) repeated in an error sentence.
const MAX_DETAIL_CHARS: usize = 500;

type HttpClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// A client of one admin API. Not `Debug`: it holds the admin token.
pub struct AdminClient {
    base: Url,
    /// `Bearer <token>`, marked sensitive.
    auth: HeaderValue,
    http: HttpClient,
}

/// A successful answer: a 2xx status and the whole body.
pub struct Answer {
    pub status: StatusCode,
    pub body: Bytes,
}

impl Answer {
    /// The body as it came, checked to be JSON, ending in a newline.
    pub fn text(&self) -> Result<String, CliError> {
        serde_json::from_slice::<serde::de::IgnoredAny>(&self.body).map_err(|e| not_json(&e))?;
        let text = std::str::from_utf8(&self.body).map_err(|_| {
            CliError::Runtime("the admin API answered text that is not UTF-8".into())
        })?;
        Ok(format!("{}\n", text.trim_end()))
    }

    /// The body parsed as `T`.
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T, CliError> {
        serde_json::from_slice(&self.body).map_err(|e| not_json(&e))
    }
}

fn not_json(e: &serde_json::Error) -> CliError {
    CliError::Runtime(format!(
        "the admin API answered {} that this client does not understand: {e}",
        if e.is_data() {
            "JSON"
        } else {
            "something other than JSON"
        }
    ))
}

impl AdminClient {
    /// A client of the admin API at `admin_url`, authenticating with `token`.
    pub fn new(admin_url: &str, token: &AdminToken) -> Result<AdminClient, CliError> {
        let base = parse_base(admin_url)?;
        let mut auth = HeaderValue::from_str(&format!("Bearer {}", token.expose().trim()))
            .map_err(|_| {
                CliError::Usage(
                    "the admin token holds characters that cannot be sent in an HTTP header".into(),
                )
            })?;
        auth.set_sensitive(true);
        let mut tcp = HttpConnector::new();
        tcp.enforce_http(false);
        tcp.set_nodelay(true);
        tcp.set_connect_timeout(Some(CONNECT_TIMEOUT));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())
            .map_err(|e| CliError::Runtime(format!("cannot set up TLS: {e}")))?
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(tcp);
        let http = Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .build(https);
        Ok(AdminClient { base, auth, http })
    }

    /// The admin URL as shown in messages.
    pub fn shown(&self) -> &str {
        self.base.as_str().trim_end_matches('/')
    }

    /// Sends one call: `path` (starting with `/v1/`) under the admin URL,
    /// `query` already encoded, `body` as JSON. A non-2xx answer is an error.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        query: Option<&str>,
        body: Option<&Value>,
    ) -> Result<Answer, CliError> {
        let mut url = self.base.clone();
        url.set_path(&format!("{}{path}", self.base.path().trim_end_matches('/')));
        url.set_query(query.filter(|q| !q.is_empty()));
        let uri: http::Uri = url
            .as_str()
            .parse()
            .map_err(|e| CliError::Usage(format!("cannot build a request URL from {url}: {e}")))?;
        let mut req = Request::builder()
            .method(method)
            .uri(uri)
            .header(header::AUTHORIZATION, self.auth.clone())
            .header(header::ACCEPT, "application/json, application/problem+json")
            .header(
                header::USER_AGENT,
                concat!("keygate-cli/", env!("CARGO_PKG_VERSION")),
            );
        let bytes = match body {
            Some(v) => {
                req = req.header(header::CONTENT_TYPE, "application/json");
                Bytes::from(v.to_string())
            }
            None => Bytes::new(),
        };
        let req = req
            .body(Full::new(bytes))
            .map_err(|e| CliError::Runtime(format!("cannot build the request: {e}")))?;

        let exchange = async {
            let resp = self
                .http
                .request(req)
                .await
                .map_err(|e| self.transport_error(&e))?;
            let (parts, body) = resp.into_parts();
            let body = Limited::new(body, MAX_ANSWER_BYTES)
                .collect()
                .await
                .map_err(|e| {
                    CliError::Runtime(format!(
                        "reading the answer of the admin API at {} failed: {}",
                        self.shown(),
                        root_cause(&*e)
                    ))
                })?
                .to_bytes();
            Ok::<_, CliError>((parts.status, parts.headers, body))
        };
        let (status, headers, body) = tokio::time::timeout(CALL_TIMEOUT, exchange)
            .await
            .map_err(|_| {
                CliError::Runtime(format!(
                    "the admin API at {} did not answer within {} seconds",
                    self.shown(),
                    CALL_TIMEOUT.as_secs()
                ))
            })??;
        if status.is_success() {
            Ok(Answer { status, body })
        } else {
            Err(error_answer(status, &headers, &body, self.shown()))
        }
    }

    /// A failed exchange as one sentence naming the admin URL.
    fn transport_error(&self, e: &hyper_util::client::legacy::Error) -> CliError {
        let shown = self.shown();
        let refused = chain(e).any(|s| {
            s.downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionRefused)
        });
        CliError::Runtime(if refused {
            format!(
                "cannot connect to the admin API at {shown}: connection refused; is keygate running there, and is --admin-url (or KEYGATE_ADMIN_URL) right?"
            )
        } else if e.is_connect() {
            format!(
                "cannot connect to the admin API at {shown}: {}",
                root_cause(e)
            )
        } else {
            format!(
                "the request to the admin API at {shown} failed: {}",
                root_cause(e)
            )
        })
    }
}

/// Checks `--admin-url`: absolute http(s) with a host and no credentials;
/// query and fragment are dropped, a path is kept as a prefix.
fn parse_base(s: &str) -> Result<Url, CliError> {
    let mut url = Url::parse(s.trim()).map_err(|e| {
        CliError::Usage(format!(
            "--admin-url {s:?} is not a valid URL ({e}); expected e.g. http://127.0.0.1:8081"
        ))
    })?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(CliError::Usage(format!(
            "--admin-url must be an http:// or https:// URL, not {}://",
            url.scheme()
        )));
    }
    if url.host().is_none() {
        return Err(CliError::Usage("--admin-url has no host".into()));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(CliError::Usage(
            "--admin-url must not hold a user name or password; pass the admin token with --token or KEYGATE_ADMIN_TOKEN".into(),
        ));
    }
    url.set_query(None);
    url.set_fragment(None);
    Ok(url)
}

/// The problem+json fields this client reads.
#[derive(Deserialize)]
struct Problem {
    code: String,
    #[serde(default)]
    detail: Option<String>,
    #[serde(default)]
    title: Option<String>,
}

/// An error answer: the problem's detail and code, or the bare status when
/// the answer is not a problem (e.g. from a proxy in front of keygate).
fn error_answer(status: StatusCode, headers: &HeaderMap, body: &[u8], shown: &str) -> CliError {
    if let Ok(p) = serde_json::from_slice::<Problem>(body) {
        let detail = p
            .detail
            .filter(|d| !d.trim().is_empty())
            .or(p.title.filter(|t| !t.trim().is_empty()))
            .unwrap_or_else(|| status.canonical_reason().unwrap_or("error").to_owned());
        return CliError::Api {
            status: status.as_u16(),
            code: one_line(&p.code),
            detail: one_line(&detail),
        };
    }
    let reason = status.canonical_reason().unwrap_or("");
    let is_text = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("text/plain"));
    let said = match std::str::from_utf8(body) {
        Ok(text) if is_text && !text.trim().is_empty() => format!(": {}", one_line(text)),
        _ => String::new(),
    };
    CliError::Runtime(format!(
        "the admin API at {shown} answered HTTP {} {reason}{said}",
        status.as_u16()
    ))
}

/// Server text as part of one line: control characters and runs of
/// whitespace become one space, cut at [`MAX_DETAIL_CHARS`].
fn one_line(s: &str) -> String {
    let mut out = String::new();
    for word in s.split(|c: char| c.is_whitespace() || c.is_control()) {
        if word.is_empty() {
            continue;
        }
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(word);
    }
    if out.chars().count() > MAX_DETAIL_CHARS {
        out = out.chars().take(MAX_DETAIL_CHARS - 1).collect();
        out.push('…');
    }
    out
}

/// `e` and its sources, outermost first.
fn chain<'a>(
    e: &'a (dyn StdError + 'static),
) -> impl Iterator<Item = &'a (dyn StdError + 'static)> {
    std::iter::successors(Some(e), |&e| e.source())
}

/// The innermost cause of `e`, which names what really went wrong.
fn root_cause(e: &(dyn StdError + 'static)) -> String {
    chain(e).last().map(ToString::to_string).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn admin_urls_are_checked() {
        assert_eq!(
            parse_base("http://127.0.0.1:8081").unwrap().as_str(),
            "http://127.0.0.1:8081/"
        );
        assert_eq!(
            parse_base("https://gw.example.com/admin/?x=1#f")
                .unwrap()
                .as_str(),
            "https://gw.example.com/admin/"
        );
        for (bad, needle) in [
            ("127.0.0.1:8081", "http"),
            ("ftp://x", "http:// or https://"),
            ("not a url", "not a valid URL"),
            ("http://user:pw@host", "user name or password"),
        ] {
            let e = parse_base(bad).unwrap_err();
            assert!(matches!(e, CliError::Usage(_)), "{bad}: {e:?}");
            assert!(e.to_string().contains(needle), "{bad}: {e}");
        }
        // The password is never repeated.
        let e = parse_base("http://user:hunter2@host").unwrap_err();
        assert!(!e.to_string().contains("hunter2"), "{e}");
    }

    #[test]
    fn problems_become_one_sentence() {
        let body = json!({
            "type": "about:blank", "title": "Invalid admin token", "status": 401,
            "code": "invalid_admin_token",
            "detail": "a valid admin token is required\n(Authorization: Bearer <admin token>)",
            "request_id": "r1"
        });
        let e = error_answer(
            StatusCode::UNAUTHORIZED,
            &HeaderMap::new(),
            body.to_string().as_bytes(),
            "http://x",
        );
        assert_eq!(
            e.to_string(),
            "a valid admin token is required (Authorization: Bearer <admin token>) (invalid_admin_token, HTTP 401)"
        );
        // No detail: the title.
        let e = error_answer(
            StatusCode::NOT_FOUND,
            &HeaderMap::new(),
            br#"{"code":"key_not_found","title":"Key not found"}"#,
            "http://x",
        );
        assert_eq!(e.to_string(), "Key not found (key_not_found, HTTP 404)");
    }

    #[test]
    fn other_error_answers_name_the_url_and_status() {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        let e = error_answer(
            StatusCode::BAD_GATEWAY,
            &h,
            b"upstream\r\ndown",
            "https://gw",
        );
        assert_eq!(
            e.to_string(),
            "the admin API at https://gw answered HTTP 502 Bad Gateway: upstream down"
        );
        assert_eq!(e.exit_code(), super::super::EXIT_RUNTIME);
        let e = error_answer(
            StatusCode::BAD_GATEWAY,
            &HeaderMap::new(),
            b"<html>",
            "https://gw",
        );
        assert_eq!(
            e.to_string(),
            "the admin API at https://gw answered HTTP 502 Bad Gateway"
        );
    }

    #[test]
    fn answers_are_printed_as_sent() {
        let a = Answer {
            status: StatusCode::OK,
            body: Bytes::from_static(b"{\"b\":1,\"a\":2}\n\n"),
        };
        assert_eq!(a.text().unwrap(), "{\"b\":1,\"a\":2}\n");
        let a = Answer {
            status: StatusCode::OK,
            body: Bytes::from_static(b"<html>"),
        };
        assert!(a.text().is_err());
    }

    #[test]
    fn one_line_cuts_long_text() {
        let long = "x".repeat(MAX_DETAIL_CHARS + 10);
        let out = one_line(&long);
        assert_eq!(out.chars().count(), MAX_DETAIL_CHARS);
        assert!(out.ends_with('…'));
    }

    #[tokio::test]
    async fn a_refused_connection_names_the_admin_url() {
        // Bind then drop a listener: the port is very likely closed now.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let url = format!("http://{addr}");
        let token: AdminToken = "kgadm_secret_token".parse().unwrap();
        let client = AdminClient::new(&url, &token).unwrap();
        let e = client
            .send(Method::GET, "/v1/keys", None, None)
            .await
            .err()
            .expect("nothing listens there");
        let msg = e.to_string();
        assert_eq!(e.exit_code(), super::super::EXIT_RUNTIME);
        assert!(msg.contains(&url), "{msg}");
        assert!(msg.contains("connection refused"), "{msg}");
        assert!(!msg.contains("kgadm_secret_token"), "{msg}");
    }
}
