//! DigitalOcean API v2 stand-in: `GET /v2/sizes`, `/v2/regions`,
//! `/v2/images?type=distribution` (page paging: `links.pages.next` is the
//! next page's URL), `POST /v2/account/keys`, `POST /v2/droplets` (202,
//! `new`, no networks), `GET /v2/droplets[?tag_name=]`, `GET|DELETE
//! /v2/droplets/{id}`, `POST /v2/droplets/{id}/actions` (`power_off`,
//! `power_on`, `resize` of a droplet that is off) and `GET
//! /v2/droplets/{id}/actions/{action_id}`.
//! Errors are `{"id": "…", "message": "…"}`.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

use super::{
    gate, json, no_content, page_of, tags_of, Machine, StandAction, StandIn, StandState,
    ACTIVE_AFTER_GETS, DO_TOKEN,
};

type S = State<(Arc<StandState>, String)>;
type Q = Query<std::collections::HashMap<String, String>>;

fn err(status: StatusCode, message: &str) -> Response {
    let id = match status.as_u16() {
        401 => "unauthorized",
        404 => "not_found",
        422 => "unprocessable_entity",
        429 => "too_many_requests",
        _ => "server_error",
    };
    json(status, json!({"id": id, "message": message}))
}

pub fn sizes() -> Vec<Value> {
    vec![
        json!({"slug": "s-1vcpu-1gb", "memory": 1024, "vcpus": 1, "disk": 25, "transfer": 1.0,
            "price_monthly": 6.0, "price_hourly": 0.00893, "regions": ["nyc3", "sfo3"],
            "available": true, "description": "Basic"}),
        json!({"slug": "s-1vcpu-2gb", "memory": 2048, "vcpus": 1, "disk": 50, "transfer": 2.0,
            "price_monthly": 12.0, "price_hourly": 0.01786, "regions": ["nyc3", "sfo3"],
            "available": true, "description": "Basic"}),
        json!({"slug": "s-2vcpu-4gb", "memory": 4096, "vcpus": 2, "disk": 80, "transfer": 4.0,
            "price_monthly": 24.0, "price_hourly": 0.03571, "regions": ["nyc3", "sfo3"],
            "available": true, "description": "Basic"}),
        json!({"slug": "c-2", "memory": 4096, "vcpus": 2, "disk": 25, "transfer": 4.0,
            "price_monthly": 42.0, "price_hourly": 0.0625, "regions": ["nyc3"],
            "available": true, "description": "CPU-Optimized"}),
        json!({"slug": "gpu-h100x1-80gb", "memory": 245760, "vcpus": 20, "disk": 720,
            "transfer": 15.0, "price_monthly": 2522.0, "price_hourly": 3.39, "regions": ["nyc2"],
            "available": true, "description": "H100 GPU - 1X",
            "gpu_info": {"count": 1, "vram": {"amount": 80, "unit": "gib"}, "model": "nvidia_h100"}}),
        json!({"slug": "s-retired", "memory": 512, "vcpus": 1, "disk": 10, "transfer": 0.5,
            "price_monthly": 4.0, "price_hourly": 0.00595, "regions": [],
            "available": false, "description": "Basic"}),
    ]
}

fn regions() -> Vec<Value> {
    vec![
        json!({"name": "New York 3", "slug": "nyc3", "features": ["backups", "ipv6"],
            "available": true, "sizes": ["s-1vcpu-1gb"]}),
        json!({"name": "San Francisco 3", "slug": "sfo3", "features": ["backups"],
            "available": true, "sizes": ["s-1vcpu-1gb"]}),
        json!({"name": "New York 2", "slug": "nyc2", "features": [],
            "available": true, "sizes": ["gpu-h100x1-80gb"]}),
    ]
}

fn images() -> Vec<Value> {
    vec![
        json!({"id": 123456789, "name": "24.04 (LTS) x64", "distribution": "Ubuntu",
            "slug": "ubuntu-24-04-x64", "public": true, "regions": ["nyc3", "sfo3"],
            "type": "base", "min_disk_size": 7}),
        json!({"id": 123456790, "name": "12 x64", "distribution": "Debian",
            "slug": "debian-12-x64", "public": true, "regions": ["nyc3", "sfo3"],
            "type": "base", "min_disk_size": 7}),
    ]
}

/// A page-numbered list; the next link is an absolute URL.
fn paged(base: &str, path: &str, key: &str, items: &[Value], q: &Q) -> Response {
    let page: usize = q
        .get("page")
        .and_then(|p| p.parse().ok())
        .unwrap_or(1)
        .max(1);
    let cap = 2;
    let (slice, next) = page_of(items, (page - 1) * cap, cap);
    let mut pages = serde_json::Map::new();
    if next.is_some() {
        let mut extra = String::new();
        for (k, v) in q.iter() {
            if k != "page" && k != "per_page" {
                extra.push_str(&format!("&{k}={v}"));
            }
        }
        pages.insert(
            "next".into(),
            json!(format!(
                "{base}{path}?page={}&per_page={cap}{extra}",
                page + 1
            )),
        );
    }
    json(
        StatusCode::OK,
        json!({key: slice, "links": {"pages": pages}, "meta": {"total": items.len()}}),
    )
}

fn droplet_json(s: &StandState, m: &Machine) -> Value {
    let active = m.gets > ACTIVE_AFTER_GETS;
    let status = match (active, m.off) {
        (false, _) => "new",
        (true, true) => "off",
        (true, false) => "active",
    };
    let v4 = if active {
        json!([{"ip_address": "10.128.0.5", "netmask": "255.255.0.0", "gateway": "", "type": "private"},
               {"ip_address": m.ip, "netmask": "255.255.240.0", "gateway": "198.51.100.1", "type": "public"}])
    } else {
        json!([])
    };
    json!({
        "id": m.id.parse::<u64>().unwrap_or(0), "name": m.label, "memory": 1024, "vcpus": 1,
        "disk": m.disk, "locked": locked(s, &m.id), "status": status,
        "created_at": "2026-01-01T00:00:00Z", "features": [], "backup_ids": [],
        "snapshot_ids": [], "image": {"id": m.os_id}, "size_slug": m.plan,
        "networks": {"v4": v4, "v6": []}, "region": {"slug": m.region, "name": m.region},
        "tags": m.tags,
    })
}

async fn list_sizes(State((s, base)): S, h: HeaderMap, q: Q) -> Response {
    if let Some(r) = gate(&s, &h, DO_TOKEN, err) {
        return r;
    }
    s.catalogue_calls.fetch_add(1, Ordering::SeqCst);
    paged(&base, "/sizes", "sizes", &sizes(), &q)
}

async fn list_regions(State((s, base)): S, h: HeaderMap, q: Q) -> Response {
    if let Some(r) = gate(&s, &h, DO_TOKEN, err) {
        return r;
    }
    s.catalogue_calls.fetch_add(1, Ordering::SeqCst);
    paged(&base, "/regions", "regions", &regions(), &q)
}

async fn list_images(State((s, base)): S, h: HeaderMap, q: Q) -> Response {
    if let Some(r) = gate(&s, &h, DO_TOKEN, err) {
        return r;
    }
    s.catalogue_calls.fetch_add(1, Ordering::SeqCst);
    let items: Vec<Value> = match q.get("type").map(String::as_str) {
        Some("distribution") | None => images(),
        Some(_) => vec![],
    };
    paged(&base, "/images", "images", &items, &q)
}

async fn create_key(State((s, _)): S, h: HeaderMap, Json(b): Json<Value>) -> Response {
    if let Some(r) = gate(&s, &h, DO_TOKEN, err) {
        return r;
    }
    let Some(key) = b["public_key"].as_str() else {
        return err(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Key invalid, key should be of the form ...",
        );
    };
    let n = s.next();
    s.ssh_keys.lock().unwrap().push(key.to_owned());
    json(
        StatusCode::CREATED,
        json!({"ssh_key": {"id": 512000 + n, "fingerprint": format!("3b:16:bf:e4:8b:00:8b:b8:59:8c:a9:d3:f0:19:45:{:02x}", n % 256),
            "public_key": key, "name": b["name"]}}),
    )
}

async fn create(State((s, _)): S, h: HeaderMap, Json(b): Json<Value>) -> Response {
    if let Some(r) = gate(&s, &h, DO_TOKEN, err) {
        return r;
    }
    if let Some(r) = s.create_gate(StatusCode::UNPROCESSABLE_ENTITY, err).await {
        return r;
    }
    let (Some(name), Some(region), Some(size), Some(image)) = (
        b["name"].as_str(),
        b["region"].as_str(),
        b["size"].as_str(),
        b["image"].as_u64(),
    ) else {
        return err(
            StatusCode::UNPROCESSABLE_ENTITY,
            "You specified invalid droplet attributes.",
        );
    };
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
    {
        return err(StatusCode::UNPROCESSABLE_ENTITY, "Name is invalid.");
    }
    let Some(sz) = sizes().into_iter().find(|p| p["slug"] == size) else {
        return err(StatusCode::UNPROCESSABLE_ENTITY, "Size is not available.");
    };
    let n = s.next();
    let m = Machine {
        id: (3_164_000 + n).to_string(),
        plan: size.into(),
        region: region.into(),
        os_id: image,
        label: name.into(),
        tags: tags_of(&b),
        ssh_keys: b["ssh_keys"].as_array().cloned().unwrap_or_default(),
        gets: 0,
        ip: format!("198.51.100.{}", n % 250 + 1),
        password: String::new(),
        disk: sz["disk"].as_u64().unwrap_or(0),
        deleted: false,
        off: false,
    };
    s.book(&m).await;
    json(
        StatusCode::ACCEPTED,
        json!({"droplet": droplet_json(&s, &m),
            "links": {"actions": [{"id": 7515, "rel": "create", "href": "https://api.digitalocean.com/v2/actions/7515"}]}}),
    )
}

async fn list_droplets(State((s, base)): S, h: HeaderMap, q: Q) -> Response {
    if let Some(r) = gate(&s, &h, DO_TOKEN, err) {
        return r;
    }
    let all = s.listed(q.get("tag_name"), |m| droplet_json(&s, m));
    paged(&base, "/droplets", "droplets", &all, &q)
}

async fn get_droplet(State((s, _)): S, h: HeaderMap, Path(id): Path<String>) -> Response {
    if let Some(r) = gate(&s, &h, DO_TOKEN, err) {
        return r;
    }
    if s.fail_get.load(Ordering::SeqCst) {
        return err(
            StatusCode::INTERNAL_SERVER_ERROR,
            "Server was unable to give you a response.",
        );
    }
    match s.polled(&id, |m| droplet_json(&s, m)) {
        Some(v) => json(StatusCode::OK, json!({"droplet": v})),
        None => err(
            StatusCode::NOT_FOUND,
            "The resource you were accessing could not be found.",
        ),
    }
}

async fn delete_droplet(State((s, _)): S, h: HeaderMap, Path(id): Path<String>) -> Response {
    if let Some(r) = gate(&s, &h, DO_TOKEN, err) {
        return r;
    }
    if s.remove(&id) {
        no_content()
    } else {
        err(
            StatusCode::NOT_FOUND,
            "The resource you were accessing could not be found.",
        )
    }
}

/// Whether droplet `id` has an action still in progress (DigitalOcean
/// locks it: another action is refused with 422).
fn locked(s: &StandState, id: &str) -> bool {
    s.actions
        .lock()
        .unwrap()
        .values()
        .any(|a| a.droplet == id && !a.completed())
}

fn action_json(a: &StandAction, region: &str) -> Value {
    let done = a.completed();
    json!({"action": {"id": a.id, "status": if done { "completed" } else { "in-progress" },
        "type": a.kind, "started_at": "2026-01-01T00:00:00Z",
        "completed_at": if done { json!("2026-01-01T00:01:00Z") } else { Value::Null },
        "resource_id": a.droplet.parse::<u64>().unwrap_or(0), "resource_type": "droplet",
        "region_slug": region}})
}

/// `POST /v2/droplets/{id}/actions`: `power_off`, `power_on` and `resize`
/// (`size`, `disk`). As at DigitalOcean, an action on a droplet with one
/// still in progress, and a resize of a droplet that is not off, are
/// refused with 422 `unprocessable_entity`. The effect is applied at once;
/// the action reports `completed` after it was polled.
async fn droplet_action(
    State((s, _)): S,
    h: HeaderMap,
    Path(id): Path<String>,
    Json(b): Json<Value>,
) -> Response {
    if let Some(r) = gate(&s, &h, DO_TOKEN, err) {
        return r;
    }
    let kind = b["type"].as_str().unwrap_or("").to_owned();
    let mut machines = s.machines.lock().unwrap();
    let Some(m) = machines.get_mut(&id).filter(|m| !m.deleted) else {
        return err(
            StatusCode::NOT_FOUND,
            "The resource you were accessing could not be found.",
        );
    };
    let refuse = |message: &str| {
        s.actions_refused
            .lock()
            .unwrap()
            .push((id.clone(), kind.clone()));
        err(StatusCode::UNPROCESSABLE_ENTITY, message)
    };
    if locked(&s, &id) {
        return refuse("Droplet already has a pending event.");
    }
    match kind.as_str() {
        "power_off" => m.off = true,
        "power_on" => m.off = false,
        "resize" => {
            let (Some(size), Some(disk)) = (b["size"].as_str(), b["disk"].as_bool()) else {
                return refuse("size and disk are required.");
            };
            if !m.off {
                return refuse("Droplet is currently on. Please power it off to run this event.");
            }
            let Some(sz) = sizes().into_iter().find(|p| p["slug"] == size) else {
                return refuse("Size is not available.");
            };
            let new_disk = sz["disk"].as_u64().unwrap_or(0);
            if new_disk < m.disk {
                return refuse("The disk of a Droplet cannot be decreased.");
            }
            m.plan = size.into();
            if disk {
                m.disk = new_disk;
            }
            s.resizes
                .lock()
                .unwrap()
                .push((id.clone(), size.to_owned(), disk));
        }
        _ => return refuse("Action type is not supported here."),
    }
    let a = StandAction {
        id: 36_804_000 + s.next() as u64,
        droplet: id.clone(),
        kind: kind.clone(),
        gets: 0,
    };
    s.actions.lock().unwrap().insert(a.id, a.clone());
    s.action_log.lock().unwrap().push((id.clone(), kind));
    json(StatusCode::CREATED, action_json(&a, &m.region))
}

/// `GET /v2/droplets/{id}/actions/{action_id}`.
async fn get_action(
    State((s, _)): S,
    h: HeaderMap,
    Path((id, action_id)): Path<(String, u64)>,
) -> Response {
    if let Some(r) = gate(&s, &h, DO_TOKEN, err) {
        return r;
    }
    let region = s
        .machines
        .lock()
        .unwrap()
        .get(&id)
        .map(|m| m.region.clone())
        .unwrap_or_default();
    let mut actions = s.actions.lock().unwrap();
    match actions.get_mut(&action_id).filter(|a| a.droplet == id) {
        Some(a) => {
            a.gets += 1;
            json(StatusCode::OK, action_json(a, &region))
        }
        None => err(
            StatusCode::NOT_FOUND,
            "The resource you were accessing could not be found.",
        ),
    }
}

pub async fn start() -> StandIn {
    let state = Arc::new(StandState::default());
    // The base URL must be known to write next-page links: bind first.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let base = format!("http://{addr}/v2");
    let app = Router::new()
        .route("/v2/sizes", get(list_sizes))
        .route("/v2/regions", get(list_regions))
        .route("/v2/images", get(list_images))
        .route("/v2/account/keys", post(create_key))
        .route("/v2/droplets", post(create).get(list_droplets))
        .route("/v2/droplets/{id}", get(get_droplet).delete(delete_droplet))
        .route("/v2/droplets/{id}/actions", post(droplet_action))
        .route("/v2/droplets/{id}/actions/{action_id}", get(get_action))
        .with_state((state.clone(), base.clone()));
    tokio::spawn(async move { axum::serve(listener, app).await });
    StandIn { url: base, state }
}
