//! The OpenAPI document matches the server: every route the server has is documented, and every
//! documented route exists.

use serde_json::Value;

use crate::helpers::*;

fn document() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.json");
    serde_json::from_str(&std::fs::read_to_string(path).expect("openapi.json exists"))
        .expect("openapi.json is JSON")
}

#[test]
fn every_server_route_is_documented_and_nothing_else() {
    let doc = document();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let table = pgsidecar::api::route_table();
    for (method, path) in &table {
        let op = &doc["paths"][path][method.to_lowercase()];
        assert!(op.is_object(), "{method} {path} is not in openapi.json");
        assert!(
            op["responses"].is_object(),
            "{method} {path} has no responses"
        );
    }
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            if !["get", "put", "post", "delete", "patch", "head", "options"]
                .contains(&method.as_str())
            {
                continue;
            }
            assert!(
                table
                    .iter()
                    .any(|(m, p)| p == path && m.eq_ignore_ascii_case(method)),
                "openapi.json documents {method} {path}, which the server does not have"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_in_the_table_is_served() {
    let s = Sidecar::start().await;
    for (method, path) in pgsidecar::api::route_table() {
        let concrete = path
            .replace("{token}", "x")
            .replace("{key}", "k")
            .replace("{user_id}", "u");
        if path == "/v1/events" {
            // A stream that does not end: its head is the answer.
            let r = s.http.get(s.url(path)).send().await.unwrap();
            assert_eq!(r.status(), 200, "{method} {path}");
            continue;
        }
        let r = s
            .http
            .request(method.parse().unwrap(), s.url(&concrete))
            .body("{}")
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let body = r.text().await.unwrap();
        assert_ne!(status, 405, "{method} {path}");
        assert!(
            !body.contains("no such route"),
            "{method} {path} is not routed"
        );
        assert!(status < 500, "{method} {path}: {status} {body}");
    }
}
