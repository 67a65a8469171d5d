//! Vultr API v2 stand-in: `GET /v2/plans`, `/v2/regions`, `/v2/os`
//! (cursor paging: `meta.links.next`), `POST /v2/ssh-keys`, `POST
//! /v2/instances` (202, `pending`, `main_ip` `0.0.0.0`,
//! `default_password`), `GET /v2/instances[?tag=]`, `GET|PATCH|DELETE
//! /v2/instances/{id}`. Errors are `{"error": "…", "status": N}`.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

use super::{
    gate, json, no_content, page_of, tags_of, Machine, StandIn, StandState, ACTIVE_AFTER_GETS,
    VULTR_TOKEN,
};

type S = State<Arc<StandState>>;
type Q = Query<std::collections::HashMap<String, String>>;

fn err(status: StatusCode, message: &str) -> Response {
    json(status, json!({"error": message, "status": status.as_u16()}))
}

pub fn plans() -> Vec<Value> {
    vec![
        json!({"id": "vc2-1c-1gb", "vcpu_count": 1, "ram": 1024, "disk": 25, "disk_count": 1,
            "bandwidth": 1024, "monthly_cost": 5, "hourly_cost": 0.007, "type": "vc2",
            "locations": ["ewr", "lax"]}),
        json!({"id": "vc2-2c-4gb", "vcpu_count": 2, "ram": 4096, "disk": 80, "disk_count": 1,
            "bandwidth": 3072, "monthly_cost": 20, "hourly_cost": 0.03, "type": "vc2",
            "locations": ["ewr", "lax"]}),
        json!({"id": "vhp-1c-1gb-amd", "vcpu_count": 1, "ram": 1024, "disk": 25, "disk_count": 1,
            "bandwidth": 2048, "monthly_cost": 6, "hourly_cost": 0.009, "type": "vhp",
            "locations": ["ewr"]}),
        json!({"id": "vcg-a100-1c-6g-4vram", "vcpu_count": 1, "ram": 6144, "disk": 70,
            "disk_count": 1, "bandwidth": 1024, "monthly_cost": 90, "hourly_cost": 0.123,
            "type": "vcg", "gpu_vram_gb": 4, "gpu_type": "NVIDIA_A100", "locations": ["lax"]}),
    ]
}

fn regions() -> Vec<Value> {
    vec![
        json!({"id": "ewr", "city": "New Jersey", "country": "US", "continent": "North America",
            "options": ["ddos_protection"]}),
        json!({"id": "lax", "city": "Los Angeles", "country": "US", "continent": "North America",
            "options": []}),
        json!({"id": "ams", "city": "Amsterdam", "country": "NL", "continent": "Europe",
            "options": []}),
    ]
}

fn os_list() -> Vec<Value> {
    vec![
        json!({"id": 2284, "name": "Ubuntu 24.04 LTS x64", "arch": "x64", "family": "ubuntu"}),
        json!({"id": 2136, "name": "Debian 12 x64 (bookworm)", "arch": "x64", "family": "debian"}),
        json!({"id": 1743, "name": "Ubuntu 22.04 LTS x64", "arch": "x64", "family": "ubuntu"}),
    ]
}

/// A cursor-paged list (cursor = the start index, as an opaque string).
fn paged(key: &str, items: &[Value], q: &Q) -> Response {
    let start = q
        .get("cursor")
        .and_then(|c| c.strip_prefix("c"))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let (page, next) = page_of(items, start, 2);
    let next = next.map(|n| format!("c{n}")).unwrap_or_default();
    let prev = if start > 0 {
        format!("c{}", start.saturating_sub(2))
    } else {
        String::new()
    };
    json(
        StatusCode::OK,
        json!({key: page, "meta": {"total": items.len(), "links": {"next": next, "prev": prev}}}),
    )
}

fn instance_json(m: &Machine) -> Value {
    let active = m.gets > ACTIVE_AFTER_GETS;
    json!({
        "id": m.id, "os": "Ubuntu 24.04 LTS x64", "ram": 1024, "disk": m.disk,
        "main_ip": if active { m.ip.as_str() } else { "0.0.0.0" },
        "vcpu_count": 1, "region": m.region, "plan": m.plan,
        "date_created": "2026-01-01T00:00:00+00:00",
        "status": if active { "active" } else { "pending" },
        "power_status": "running", "server_status": if active { "ok" } else { "none" },
        "label": m.label, "os_id": m.os_id, "tags": m.tags, "hostname": "vultr.guest",
        "features": [],
    })
}

async fn list_plans(State(s): S, h: HeaderMap, q: Q) -> Response {
    if let Some(r) = gate(&s, &h, VULTR_TOKEN, err) {
        return r;
    }
    s.catalogue_calls.fetch_add(1, Ordering::SeqCst);
    paged("plans", &plans(), &q)
}

async fn list_regions(State(s): S, h: HeaderMap, q: Q) -> Response {
    if let Some(r) = gate(&s, &h, VULTR_TOKEN, err) {
        return r;
    }
    s.catalogue_calls.fetch_add(1, Ordering::SeqCst);
    paged("regions", &regions(), &q)
}

async fn list_os(State(s): S, h: HeaderMap, q: Q) -> Response {
    if let Some(r) = gate(&s, &h, VULTR_TOKEN, err) {
        return r;
    }
    s.catalogue_calls.fetch_add(1, Ordering::SeqCst);
    paged("os", &os_list(), &q)
}

async fn create_key(State(s): S, h: HeaderMap, Json(b): Json<Value>) -> Response {
    if let Some(r) = gate(&s, &h, VULTR_TOKEN, err) {
        return r;
    }
    let Some(key) = b["ssh_key"].as_str() else {
        return err(StatusCode::BAD_REQUEST, "Invalid SSH key.");
    };
    let id = format!("key-{}", s.next());
    s.ssh_keys.lock().unwrap().push(key.to_owned());
    json(
        StatusCode::CREATED,
        json!({"ssh_key": {"id": id, "date_created": "2026-01-01T00:00:00+00:00",
            "name": b["name"], "ssh_key": key}}),
    )
}

async fn create(State(s): S, h: HeaderMap, Json(b): Json<Value>) -> Response {
    if let Some(r) = gate(&s, &h, VULTR_TOKEN, err) {
        return r;
    }
    if let Some(r) = s.create_gate(StatusCode::BAD_REQUEST, err).await {
        return r;
    }
    let (Some(plan), Some(region), Some(os_id)) = (
        b["plan"].as_str(),
        b["region"].as_str(),
        b["os_id"].as_u64(),
    ) else {
        return err(StatusCode::BAD_REQUEST, "Invalid plan, region or os_id.");
    };
    let Some(p) = plans().into_iter().find(|p| p["id"] == plan) else {
        return err(StatusCode::BAD_REQUEST, "Invalid plan.");
    };
    let n = s.next();
    let m = Machine {
        id: format!("cb676a46-66fd-4dfb-b839-{n:012}"),
        plan: plan.into(),
        region: region.into(),
        os_id,
        label: b["label"].as_str().unwrap_or("").into(),
        tags: tags_of(&b),
        ssh_keys: b["sshkey_id"].as_array().cloned().unwrap_or_default(),
        gets: 0,
        ip: format!("192.0.2.{}", n % 250 + 1),
        password: format!("v5{{Fkvb#2ycPGw{n}"),
        disk: p["disk"].as_u64().unwrap_or(0),
        deleted: false,
        off: false,
    };
    s.book(&m).await;
    let mut v = instance_json(&m);
    v["default_password"] = json!(m.password);
    json(StatusCode::ACCEPTED, json!({"instance": v}))
}

async fn list_instances(State(s): S, h: HeaderMap, q: Q) -> Response {
    if let Some(r) = gate(&s, &h, VULTR_TOKEN, err) {
        return r;
    }
    let all = s.listed(q.get("tag"), instance_json);
    paged("instances", &all, &q)
}

async fn get_instance(State(s): S, h: HeaderMap, Path(id): Path<String>) -> Response {
    if let Some(r) = gate(&s, &h, VULTR_TOKEN, err) {
        return r;
    }
    if s.fail_get.load(Ordering::SeqCst) {
        return err(StatusCode::INTERNAL_SERVER_ERROR, "Internal error.");
    }
    match s.polled(&id, instance_json) {
        Some(v) => json(StatusCode::OK, json!({"instance": v})),
        None => err(StatusCode::NOT_FOUND, "Instance not found."),
    }
}

async fn patch_instance(
    State(s): S,
    h: HeaderMap,
    Path(id): Path<String>,
    Json(b): Json<Value>,
) -> Response {
    if let Some(r) = gate(&s, &h, VULTR_TOKEN, err) {
        return r;
    }
    let Some(plan) = b["plan"].as_str() else {
        return err(StatusCode::BAD_REQUEST, "Nothing to update.");
    };
    let Some(p) = plans().into_iter().find(|p| p["id"] == plan) else {
        return err(StatusCode::BAD_REQUEST, "Invalid plan.");
    };
    let mut machines = s.machines.lock().unwrap();
    let Some(m) = machines.get_mut(&id).filter(|m| !m.deleted) else {
        return err(StatusCode::NOT_FOUND, "Instance not found.");
    };
    let disk = p["disk"].as_u64().unwrap_or(0);
    if disk < m.disk {
        // Vultr: plans can only be upgraded.
        return err(StatusCode::BAD_REQUEST, "Unable to downgrade plan.");
    }
    m.plan = plan.into();
    m.disk = disk;
    s.resizes
        .lock()
        .unwrap()
        .push((id.clone(), plan.to_owned(), true));
    json(StatusCode::ACCEPTED, json!({"instance": instance_json(m)}))
}

async fn delete_instance(State(s): S, h: HeaderMap, Path(id): Path<String>) -> Response {
    if let Some(r) = gate(&s, &h, VULTR_TOKEN, err) {
        return r;
    }
    if s.remove(&id) {
        no_content()
    } else {
        err(StatusCode::NOT_FOUND, "Instance not found.")
    }
}

pub async fn start() -> StandIn {
    let state = Arc::new(StandState::default());
    let app = Router::new()
        .route("/v2/plans", get(list_plans))
        .route("/v2/regions", get(list_regions))
        .route("/v2/os", get(list_os))
        .route("/v2/ssh-keys", post(create_key))
        .route("/v2/instances", post(create).get(list_instances))
        .route(
            "/v2/instances/{id}",
            get(get_instance)
                .patch(patch_instance)
                .delete(delete_instance),
        )
        .with_state(state.clone());
    let base = super::serve(app).await;
    StandIn {
        url: format!("{base}/v2"),
        state,
    }
}
