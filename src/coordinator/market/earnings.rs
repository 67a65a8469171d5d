//! `GET /grid/nodes/{id}/earnings`: what a node's jobs earned its operator
//! (the operator share of each usage row), per UTC day and per model, and
//! how much of it was paid out (`sgl coordinator payouts`). Auth: the
//! node's token or its owner wallet's signature ([`super::owner`]).

use std::collections::BTreeMap;

use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::Json;

use super::node_or_404;
use crate::coordinator::error::ClientError;
use crate::coordinator::state::Grid;
use crate::proto::api::{DayEarnings, EarningsTotals, ModelEarnings, NodeEarningsResponse};
use crate::store::payouts::DAY_MS;
use crate::store::EarningsRow;

/// The window when `days` is not given, and the longest one allowed.
pub const DEFAULT_DAYS: u32 = 30;
pub const MAX_DAYS: u32 = 366;

/// `days=N` from the query string; nothing else is accepted.
fn parse_days(query: Option<&str>) -> Result<u32, ClientError> {
    let bad = || {
        ClientError::invalid(
            "invalid_request",
            format!("the only query parameter is days, an integer from 1 to {MAX_DAYS}"),
        )
    };
    let mut days = DEFAULT_DAYS;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("days", v)) if v.len() <= 4 => {
                days = v.parse().map_err(|_| bad())?;
            }
            _ => return Err(bad()),
        }
    }
    if !(1..=MAX_DAYS).contains(&days) {
        return Err(bad());
    }
    Ok(days)
}

fn nonneg(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn add(t: &mut EarningsTotals, r: &EarningsRow) {
    t.jobs = t.jobs.saturating_add(nonneg(r.jobs));
    t.prompt_tokens = t.prompt_tokens.saturating_add(nonneg(r.prompt_tokens));
    t.completion_tokens = t
        .completion_tokens
        .saturating_add(nonneg(r.completion_tokens));
    t.revenue_micro_usd = t.revenue_micro_usd.saturating_add(r.revenue.0);
    t.earned_micro_usd = t.earned_micro_usd.saturating_add(r.earned.0);
    t.paid_micro_usd = t.paid_micro_usd.saturating_add(r.paid.0);
    t.in_payout_batch_micro_usd = t.in_payout_batch_micro_usd.saturating_add(r.in_batch.0);
    t.unpaid_micro_usd = t.earned_micro_usd.saturating_sub(t.paid_micro_usd);
}

fn day_string(day: i64) -> String {
    let secs = u64::try_from(day).unwrap_or(0).saturating_mul(86_400);
    crate::timefmt::format_rfc3339(secs)[..10].to_string()
}

/// Sum the store's (day, model) rows into the response.
pub fn summarise(
    node_id: String,
    operator_wallet: String,
    rows: &[EarningsRow],
    days: u32,
    now_ms: i64,
) -> NodeEarningsResponse {
    let first_day = now_ms.div_euclid(DAY_MS) - i64::from(days) + 1;
    let mut lifetime = EarningsTotals::default();
    let mut window = EarningsTotals::default();
    let mut by_day: BTreeMap<i64, EarningsTotals> = BTreeMap::new();
    let mut by_model: BTreeMap<String, EarningsTotals> = BTreeMap::new();
    for r in rows {
        add(&mut lifetime, r);
        if r.day < first_day {
            continue;
        }
        add(&mut window, r);
        add(by_day.entry(r.day).or_default(), r);
        add(by_model.entry(r.model.clone()).or_default(), r);
    }
    NodeEarningsResponse {
        node_id,
        operator_wallet,
        days,
        since: day_string(first_day),
        lifetime,
        window,
        by_day: by_day
            .into_iter()
            .map(|(d, totals)| DayEarnings {
                day: day_string(d),
                totals,
            })
            .collect(),
        by_model: by_model
            .into_iter()
            .map(|(model, totals)| ModelEarnings { model, totals })
            .collect(),
    }
}

/// `GET /grid/nodes/{id}/earnings[?days=N]`.
pub async fn earnings(
    State(grid): State<Grid>,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Json<NodeEarningsResponse>, ClientError> {
    let node_id = node_or_404(&id)?;
    super::owner::authorize(&grid, &node_id, &method, &uri, &headers, &[]).await?;
    let days = parse_days(query.as_deref())?;
    let Some(store) = grid.store() else {
        return Err(ClientError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "no_ledger",
            "this coordinator keeps no ledger (--in-memory): there are no earnings",
        ));
    };
    let wallet = {
        let inner = grid.lock();
        inner
            .node(&node_id)
            .map(|n| n.wallet_address.clone())
            .ok_or_else(|| ClientError::not_found("node_not_found", "no such node"))?
    };
    let rows = store
        .node_earnings(&node_id.to_string())
        .await
        .map_err(ClientError::internal)?;
    Ok(Json(summarise(
        node_id.to_string(),
        wallet,
        &rows,
        days,
        grid.config.clock.now_ms(),
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::money::Micros;

    fn row(day: i64, model: &str, earned: u64, paid: u64, in_batch: u64) -> EarningsRow {
        EarningsRow {
            day,
            model: model.into(),
            jobs: 1,
            prompt_tokens: 2,
            completion_tokens: 3,
            revenue: Micros(earned * 2),
            earned: Micros(earned),
            paid: Micros(paid),
            in_batch: Micros(in_batch),
        }
    }

    #[test]
    fn the_window_cuts_days_and_lifetime_keeps_all() {
        let today = 20_000;
        let now = today * DAY_MS + 5;
        let rows = [
            row(today - 40, "a", 100, 100, 0),
            row(today - 1, "a", 10, 0, 10),
            row(today, "a", 7, 0, 0),
            row(today, "b", 5, 5, 0),
        ];
        let r = summarise("n".into(), "w".into(), &rows, 30, now);
        assert_eq!(r.lifetime.earned_micro_usd, 122);
        assert_eq!(r.lifetime.paid_micro_usd, 105);
        assert_eq!(r.lifetime.unpaid_micro_usd, 17);
        assert_eq!(r.window.earned_micro_usd, 22);
        assert_eq!(r.window.in_payout_batch_micro_usd, 10);
        assert_eq!(r.by_day.len(), 2);
        assert_eq!(r.by_day[1].totals.earned_micro_usd, 12);
        assert_eq!(r.by_day[1].day, day_string(today));
        assert_eq!(r.by_model[0].model, "a");
        assert_eq!(r.by_model[0].totals.earned_micro_usd, 17);
        assert_eq!(r.since, day_string(today - 29));
        assert_eq!(day_string(0), "1970-01-01");
    }

    #[test]
    fn days_is_the_only_parameter() {
        assert_eq!(parse_days(None).unwrap(), DEFAULT_DAYS);
        assert_eq!(parse_days(Some("days=7")).unwrap(), 7);
        for bad in ["days=0", "days=367", "days=x", "from=1", "days=99999999"] {
            assert!(parse_days(Some(bad)).is_err(), "{bad}");
        }
    }
}
