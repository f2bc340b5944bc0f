//! A data service over PostgreSQL that joins Ratify transactions: its own table and SQL,
//! run in a branch under the Ratify transaction id, prepared and decided by the runtime.
//!
//! `cargo run -p ratify-participant --example pg_orders -- POSTGRES_URL COORDINATOR_URL`
//! (the server needs `max_prepared_transactions > 0`).

use std::sync::Arc;
use std::time::Duration;

use ratify_participant::pg::{PgOptions, PgStore};
use ratify_participant::runtime::{Runtime, RuntimeConfig};
use ratify_participant::service::ParticipantService;
use ratify_proto::TxnId;
use ratify_proto::v1;
use ratify_proto::v1::coordinator_client::CoordinatorClient;
use ratify_proto::v1::participant_server::ParticipantServer;

/// The service's own operation: reserve stock for an order, inside Ratify transaction
/// `txn`. It enlists this participant first, then runs its SQL in the branch; the
/// coordinator's Commit or Abort decides it.
async fn reserve(
    store: &PgStore,
    coordinator: &mut CoordinatorClient<tonic::transport::Channel>,
    me: &str,
    txn: TxnId,
    item: &str,
    quantity: i32,
) -> Result<(), Box<dyn std::error::Error>> {
    coordinator
        .enlist(v1::EnlistRequest {
            txn_id: txn.to_vec().into(),
            participant: me.into(),
            endpoint: String::new(), // registered at start; see main
            incarnation: store.incarnation(),
        })
        .await?;
    let branch = store.branch(txn).await?;
    // A CHECK (stock >= 0) violation here makes the prepare vote NO with PostgreSQL's
    // message; the whole transaction then aborts.
    branch
        .execute(
            "UPDATE stock SET quantity = quantity - $2 WHERE item = $1",
            &[&item, &quantity],
        )
        .await?;
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let url = args
        .next()
        .ok_or("usage: pg_orders POSTGRES_URL COORDINATOR_URL")?;
    let coordinator_url = args
        .next()
        .ok_or("usage: pg_orders POSTGRES_URL COORDINATOR_URL")?;
    let name = "orders";

    let store = Arc::new(PgStore::open(PgOptions::new(&url, name)).await?);
    let (db, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    db.batch_execute(
        "CREATE TABLE IF NOT EXISTS stock (item text PRIMARY KEY, quantity int NOT NULL CHECK (quantity >= 0));
         INSERT INTO stock VALUES ('widget', 10) ON CONFLICT DO NOTHING",
    )
    .await?;
    let config = RuntimeConfig {
        name: name.into(),
        coordinator: Some(coordinator_url.clone()),
        ..RuntimeConfig::default()
    };
    let runtime = Runtime::recover(store.clone(), config).await?;
    let (_stop, stopped) = tokio::sync::watch::channel(false);
    tokio::spawn(runtime.clone().run_background(stopped));
    // PostgreSQL never times out a prepared transaction: adopt any of ours the runtime
    // does not know, so the termination protocol resolves them.
    let scanner = runtime.clone();
    tokio::spawn(async move {
        loop {
            if let Ok(found) = scanner.store().scan_prepared().await {
                scanner.adopt_prepared(found);
            }
            tokio::time::sleep(Duration::from_secs(10)).await;
        }
    });

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let endpoint = format!("http://{}", listener.local_addr()?);
    let mut coordinator = CoordinatorClient::connect(coordinator_url).await?;
    coordinator
        .register(v1::RegisterRequest {
            participant: name.into(),
            endpoint: endpoint.clone(),
        })
        .await?;
    println!("orders participant listening on {endpoint}");

    // What a request handler of the service would do with a transaction id from its client:
    if let Some(txn) = args.next() {
        reserve(&store, &mut coordinator, name, txn.parse()?, "widget", 1).await?;
    }

    tonic::transport::Server::builder()
        .add_service(ParticipantServer::new(ParticipantService::new(runtime)))
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            async {
                let _ = tokio::signal::ctrl_c().await;
            },
        )
        .await?;
    Ok(())
}
