//! Feeds arbitrary bytes, after the HTTP/2 preface, to the server side of an
//! HBONE connection — the same h2 settings ztunnel uses — and runs every
//! request that parses through ztunnel's CONNECT checks, answering as
//! ztunnel does. Nothing may panic; a bad request must end at most its own
//! stream (or, for a protocol violation, the connection).
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use skiff_hbone::tunnel as hbone;
use tokio::io::AsyncWriteExt;

fuzz_target!(|data: &[u8]| {
    let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().expect("runtime");
    rt.block_on(async {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let mut input = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        input.extend_from_slice(data);
        let writer = async move {
            let _ = client.write_all(&input).await;
            let _ = client.shutdown().await;
            // Keep reading so the server never blocks on a full pipe.
            let mut sink = Vec::new();
            let _ = tokio::io::AsyncReadExt::read_to_end(&mut client, &mut sink).await;
        };
        let serve = async move {
            let Ok(mut conn) = hbone::server_builder(&skiff_hbone::limits::HboneLimits::default())
                .handshake::<_, Bytes>(server)
                .await
            else {
                return;
            };
            while let Some(Ok((req, mut respond))) = conn.accept().await {
                let status = match hbone::check_connect(&req, "10.0.0.1".parse().unwrap()) {
                    Ok(_) => http::StatusCode::OK,
                    Err((s, _)) => s,
                };
                let _ = respond.send_response(http::Response::builder().status(status).body(()).unwrap(), true);
            }
        };
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), async { tokio::join!(writer, serve) }).await;
    });
});
