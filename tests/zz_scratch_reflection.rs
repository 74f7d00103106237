#[tokio::test]
async fn scratch() {
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(rws::server::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (_r, health) = tonic_health::server::health_reporter();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health)
            .add_service(reflection)
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(".venv/bin/python")
            .args(["tests/python/reflection.py", &addr.to_string()])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    println!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
