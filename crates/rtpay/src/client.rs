//! A small HTTP/1.1 client over one keep-alive connection, used by `rtpay demo`, `rtpay bench` and
//! the end-to-end tests: the same real sockets a user's client would use.

use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::{header, Method, Request, StatusCode};
use hyper_util::rt::TokioIo;

pub struct Response {
    pub status: StatusCode,
    pub headers: hyper::HeaderMap,
    pub body: Bytes,
}

impl Response {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

pub struct Client {
    addr: SocketAddr,
    sender: Option<SendRequest<Full<Bytes>>>,
}

pub type Error = Box<dyn std::error::Error + Send + Sync>;

impl Client {
    pub fn new(addr: SocketAddr) -> Client {
        Client { addr, sender: None }
    }

    /// Opens the connection now (the first request would otherwise), so that a measurement can
    /// start with it open.
    pub async fn connect(&mut self) -> Result<(), Error> {
        self.sender().await.map(|_| ())
    }

    async fn sender(&mut self) -> Result<&mut SendRequest<Full<Bytes>>, Error> {
        let usable = match &self.sender {
            Some(s) => !s.is_closed(),
            None => false,
        };
        if !usable {
            let stream = tokio::net::TcpStream::connect(self.addr).await?;
            stream.set_nodelay(true)?;
            let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            tokio::spawn(async move {
                let _ = connection.await;
            });
            self.sender = Some(sender);
        }
        Ok(self.sender.as_mut().expect("connected above"))
    }

    /// Sends a request with an optional bearer token and raw JSON body.
    pub async fn send(
        &mut self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Bytes>,
    ) -> Result<Response, Error> {
        self.send_with_headers(method, path, token, body, &[]).await
    }

    /// As [`Client::send`], plus raw `headers`; each replaces a header of the same name that
    /// `send` would set (e.g. `Content-Type`).
    pub async fn send_with_headers(
        &mut self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Bytes>,
        headers: &[(&str, &str)],
    ) -> Result<Response, Error> {
        let mut builder = Request::builder().method(method).uri(path).header(header::HOST, self.addr.to_string());
        if let Some(token) = token {
            builder = builder.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        if body.is_some() {
            builder = builder.header(header::CONTENT_TYPE, "application/json");
        }
        if let Some(map) = builder.headers_mut() {
            for (name, value) in headers {
                map.insert(header::HeaderName::from_bytes(name.as_bytes())?, header::HeaderValue::from_str(value)?);
            }
        }
        let request = builder.body(Full::new(body.unwrap_or_default()))?;
        let sender = self.sender().await?;
        sender.ready().await?;
        let response = match sender.send_request(request).await {
            Ok(r) => r,
            Err(e) => {
                self.sender = None;
                return Err(e.into());
            }
        };
        let (parts, body) = response.into_parts();
        let body = body.collect().await?.to_bytes();
        Ok(Response { status: parts.status, headers: parts.headers, body })
    }

    pub async fn post(&mut self, path: &str, token: &str, body: &serde_json::Value) -> Result<Response, Error> {
        self.send(Method::POST, path, Some(token), Some(Bytes::from(serde_json::to_vec(body)?))).await
    }

    pub async fn get(&mut self, path: &str, token: &str) -> Result<Response, Error> {
        self.send(Method::GET, path, Some(token), None).await
    }
}
