//! `wsplice demo`: three WebSocket echo backends on loopback, the balancer in front of them, and
//! a page (served by the backends through the balancer) whose client shows who answered.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::ExitCode;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use wsplice::config::{self, DataplaneMode, QuickForm};

const PAGE: &str = include_str!("demo.html");

#[derive(clap::Args)]
pub struct DemoArgs {
    /// Where the balancer listens.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: String,
    /// auto (default), sockmap or userspace.
    #[arg(long, default_value = "auto")]
    dataplane: String,
}

pub fn run(args: DemoArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("demo: cannot start a runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let members = match runtime.block_on(start_backends(3)) {
        Ok(members) => members,
        Err(error) => {
            eprintln!("demo: cannot start the echo backends: {error}");
            return ExitCode::FAILURE;
        }
    };
    let mut config = match config::quick(&QuickForm {
        listen: args.listen.clone(),
        members: members.iter().map(|a| format!("ws://{a}")).collect(),
        lbmethod: None,
        ..Default::default()
    }) {
        Ok(config) => config,
        Err(errors) => {
            eprintln!("{errors}");
            return ExitCode::from(64);
        }
    };
    config.server.dataplane = match DataplaneMode::parse(&args.dataplane) {
        Ok(mode) => mode,
        Err(message) => {
            eprintln!("command line: --dataplane: {message}");
            return ExitCode::from(64);
        }
    };
    let server = match wsplice::server::start(config) {
        Ok(server) => server,
        Err(error) => {
            eprintln!("demo: {error}");
            return ExitCode::FAILURE;
        }
    };
    let address = server.addresses[0];
    let mode = server.shared.dataplane.carrier().name();
    println!("wsplice demo: open http://{address}/  (WebSocket at ws://{address}/ws)");
    println!("wsplice demo: backends {members:?}, data plane: {mode}");
    server.wait();
    drop(runtime);
    ExitCode::SUCCESS
}

async fn start_backends(count: usize) -> std::io::Result<Vec<SocketAddr>> {
    let mut addresses = Vec::new();
    for index in 1..=count {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        addresses.push(address);
        let name = format!("backend-{index} ({address})");
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let name = name.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request| {
                        let name = name.clone();
                        async move { Ok::<_, Infallible>(backend(request, name)) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .with_upgrades()
                        .await;
                });
            }
        });
    }
    Ok(addresses)
}

/// One backend: the page on GET, an echo that names itself on a WebSocket upgrade.
fn backend(mut request: Request<Incoming>, name: String) -> Response<Full<Bytes>> {
    let Some(key) = request.headers().get(header::SEC_WEBSOCKET_KEY).cloned() else {
        let page = PAGE.replace("{{BACKEND}}", &name);
        let mut response = Response::new(Full::new(Bytes::from(page)));
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/html; charset=utf-8"),
        );
        return response;
    };
    let upgrade = hyper::upgrade::on(&mut request);
    tokio::spawn(async move {
        let Ok(upgraded) = upgrade.await else { return };
        let mut socket =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        while let Some(Ok(message)) = socket.next().await {
            let reply = match message {
                Message::Text(text) => Message::text(format!("{name} echoes: {text}")),
                Message::Binary(data) => Message::Binary(data),
                Message::Close(_) => break,
                _ => continue,
            };
            if socket.send(reply).await.is_err() {
                break;
            }
        }
    });
    let accept = derive_accept_key(key.as_bytes());
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    if let Ok(value) = HeaderValue::from_str(&accept) {
        headers.insert(header::SEC_WEBSOCKET_ACCEPT, value);
    }
    response
}
