//! `sgl bench`: measure the engine in-process (or a running server with
//! `--url`): time to first token, decode tok/s single-stream and with N
//! concurrent streams, prompt tok/s, each beside the physical limit that the
//! memory bandwidth sets (bytes of weights read per token / bytes per second).

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use futures_util::StreamExt;
use serde::Serialize;
use sgl::engine::{Engine, EngineHandle, GenerationEvent, GenerationRequest};
use sgl::proto::openai::ChatMessage;
use sgl::proto::routes;

use super::node::EngineArgs;

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Benchmark a running server (`http://127.0.0.1:8081`) instead of an
    /// in-process engine.
    #[arg(long)]
    pub url: Option<String>,
    /// Stream counts to run, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "1,8")]
    pub concurrency: Vec<usize>,
    /// Tokens each decode stream generates.
    #[arg(long, default_value_t = 128)]
    pub max_tokens: u32,
    /// Approximate prompt length of the prompt-processing run.
    #[arg(long, default_value_t = 500)]
    pub prompt_tokens: usize,
    /// Repetitions of each run; the best is reported.
    #[arg(long, default_value_t = 2)]
    pub repeat: usize,
    /// Write the results as JSON to this file ("-" for stdout).
    #[arg(long)]
    pub json: Option<String>,
    /// Size of the buffer the bandwidth probe reads, in MiB.
    #[arg(long, default_value_t = 1024)]
    pub bandwidth_mib: usize,
    /// Latency comparison: a second OpenAI-compatible endpoint serving the
    /// same model as --url, typically the coordinator in front of the node
    /// whose local server is --url. Both get the same plain (OpenAI-mode,
    /// non-stream) requests at each --concurrency value, with --max-tokens;
    /// p50/p99 latency, requests/s and the difference (the coordinator's
    /// added latency) are reported. To measure the coordinator rather than
    /// the model, run both sides with `--engine echo` (see README).
    #[arg(long, value_name = "URL", requires = "url")]
    pub compare_url: Option<String>,
    /// API key sent (as a bearer token) to --compare-url.
    #[arg(long, env = "SGL_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Requests sent to each endpoint in the latency comparison.
    #[arg(long, default_value_t = 200)]
    pub requests: usize,
    /// Multi-turn chats instead: --conversations concurrent chats of
    /// --turns turns each, a shared system prompt of about --system-tokens
    /// tokens and the history resent every turn, run once without the
    /// prefix cache and once with it (--prefix-cache-mb); TTFT per turn.
    #[arg(long, conflicts_with_all = ["url", "compare_url"])]
    pub multi_turn: bool,
    /// Turns of each multi-turn chat.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub turns: u32,
    /// Concurrent multi-turn chats.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub conversations: u32,
    /// Approximate length of the multi-turn chats' system prompt, in tokens.
    #[arg(long, default_value_t = 400, value_parser = clap::value_parser!(u32).range(1..=8000))]
    pub system_tokens: u32,
    /// Tokens of each multi-turn reply (at most; a reply may end sooner).
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub turn_tokens: u32,
}

#[derive(Debug, Clone, Serialize)]
struct StreamStats {
    prompt_tokens: u32,
    completion_tokens: u32,
    ttft_s: f64,
    /// Seconds from the first to the last token.
    decode_s: f64,
    finished_s: f64,
}

#[derive(Debug, Serialize)]
struct DecodeRun {
    streams: usize,
    ttft_p50_s: f64,
    ttft_p95_s: f64,
    per_stream_tok_s: f64,
    aggregate_tok_s: f64,
    aggregate_ratio_to_limit: f64,
    per_stream_ratio_to_limit: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    model: String,
    target: String,
    /// The CPU kernel set that ran (in-process only).
    kernels: String,
    weight_formats: Vec<String>,
    weight_bytes_per_token: u64,
    threads: usize,
    bandwidth_gib_s: f64,
    limit_tok_s: f64,
    prompt_tokens: u32,
    prompt_tok_s: f64,
    prompt_ratio_to_limit: f64,
    prompt_ttft_s: f64,
    ttft_p50_s: f64,
    ttft_p95_s: f64,
    decode: Vec<DecodeRun>,
}

enum Target {
    Local(EngineHandle),
    Remote {
        client: reqwest::Client,
        url: String,
        model: String,
    },
}

const STORY: &str =
    "Write a long, detailed story about a lighthouse keeper who finds a message in a bottle.";

/// A fixed passage for the prompt-processing run, repeated to the length asked.
const PASSAGE: &str = "The history of the lighthouse begins with fires lit on hilltops to guide ships home. \
Later, towers of stone carried lamps burning wood, coal and then oil, and lenses gathered the light into beams \
that reached far out to sea. Keepers lived beside the light, trimming wicks, winding clockwork and logging the \
weather every night, so that sailors could trust the coast to speak to them in darkness and fog. ";

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(bench(args))
}

async fn bench(args: BenchArgs) -> anyhow::Result<()> {
    if let (Some(url), Some(other)) = (&args.url, &args.compare_url) {
        return compare(&args, url, other).await;
    }
    if args.multi_turn {
        return multi_turn(&args).await;
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    eprintln!(
        "measuring memory read bandwidth ({} MiB, {threads} threads)…",
        args.bandwidth_mib
    );
    let bw = tokio::task::spawn_blocking({
        let mib = args.bandwidth_mib;
        move || sgl::engine::cpu::bandwidth::read_bandwidth(mib << 20, threads)
    })
    .await?;

    let (target, model, formats, weight_bytes) = match &args.url {
        None => {
            let cfg = args.engine.to_config()?;
            eprintln!("loading {}…", cfg.model.display());
            let engine = tokio::task::spawn_blocking(move || Engine::load(cfg)).await??;
            let info = engine.info().clone();
            eprintln!(
                "loaded {} in {:.1}s, weights {:?}",
                info.id, info.load_seconds, info.weight_formats
            );
            (
                Target::Local(engine),
                info.id,
                info.weight_formats,
                info.weight_bytes_per_token,
            )
        }
        Some(url) => {
            let client = reqwest::Client::new();
            let base = url.trim_end_matches('/').to_string();
            let models: serde_json::Value = client
                .get(format!("{base}{}", routes::MODELS))
                .send()
                .await?
                .error_for_status()?
                .json()
                .await?;
            let model = models["data"][0]["id"]
                .as_str()
                .context("the server lists no model")?
                .to_string();
            // A remote server does not say how many bytes it reads per token;
            // the file size (from the catalogue or the path) is the estimate.
            let bytes = match sgl::catalogue::find(&args.engine.model)? {
                Some(e) => e.size_bytes,
                None => std::fs::metadata(&args.engine.model)
                    .map(|m| m.len())
                    .unwrap_or(0),
            };
            (
                Target::Remote {
                    client,
                    url: base,
                    model: model.clone(),
                },
                model,
                vec!["remote".into()],
                bytes,
            )
        }
    };
    let limit = if weight_bytes > 0 {
        bw / weight_bytes as f64
    } else {
        f64::NAN
    };
    eprintln!(
        "bandwidth {:.1} GiB/s, {:.1} MiB of weights per token: limit {:.1} tok/s",
        bw / (1u64 << 30) as f64,
        weight_bytes as f64 / (1u64 << 20) as f64,
        limit
    );

    // Warm up: page in the weights, start the threads.
    let _ = one_stream(&target, Workload::Chat(STORY.into()), 8).await?;

    // Prompt processing: a long prompt, one token out.
    let reps = (args.prompt_tokens / 90).max(1);
    let long = PASSAGE.repeat(reps) + "\nSummarise the passage in one sentence.";
    let mut best_prompt: Option<StreamStats> = None;
    for _ in 0..args.repeat.max(1) {
        let s = one_stream(&target, Workload::Raw(long.clone()), 1).await?;
        if best_prompt.as_ref().is_none_or(|b| s.ttft_s < b.ttft_s) {
            best_prompt = Some(s);
        }
    }
    let prompt = best_prompt.context("no prompt run")?;
    let prompt_tok_s = prompt.prompt_tokens as f64 / prompt.ttft_s;

    let mut all_ttft = Vec::new();
    let mut runs = Vec::new();
    for &n in &args.concurrency {
        let mut best: Option<(f64, Vec<StreamStats>, f64)> = None;
        for _ in 0..args.repeat.max(1) {
            let mut tasks = Vec::new();
            for i in 0..n {
                let w = Workload::Chat(format!("{STORY} (Variation {i}.)"));
                tasks.push(one_stream(&target, w, args.max_tokens));
            }
            let stats: Vec<StreamStats> = futures_util::future::join_all(tasks)
                .await
                .into_iter()
                .collect::<anyhow::Result<_>>()?;
            let first = stats.iter().map(|s| s.ttft_s).fold(f64::INFINITY, f64::min);
            let last = stats.iter().map(|s| s.finished_s).fold(0.0, f64::max);
            let tokens: u32 = stats
                .iter()
                .map(|s| s.completion_tokens.saturating_sub(1))
                .sum();
            let agg = tokens as f64 / (last - first).max(1e-9);
            if best.as_ref().is_none_or(|b| agg > b.0) {
                best = Some((agg, stats, agg));
            }
        }
        let (_, stats, agg) = best.context("no decode run")?;
        let per: Vec<f64> = stats
            .iter()
            .map(|s| s.completion_tokens.saturating_sub(1) as f64 / s.decode_s.max(1e-9))
            .collect();
        let per_stream = per.iter().sum::<f64>() / per.len().max(1) as f64;
        let mut ttft: Vec<f64> = stats.iter().map(|s| s.ttft_s).collect();
        all_ttft.extend(ttft.iter().copied());
        ttft.sort_by(f64::total_cmp);
        runs.push(DecodeRun {
            streams: n,
            ttft_p50_s: percentile(&ttft, 0.5),
            ttft_p95_s: percentile(&ttft, 0.95),
            per_stream_tok_s: per_stream,
            aggregate_tok_s: agg,
            aggregate_ratio_to_limit: agg / limit,
            per_stream_ratio_to_limit: per_stream / limit,
        });
    }
    all_ttft.sort_by(f64::total_cmp);
    let report = Report {
        model,
        target: args.url.clone().unwrap_or_else(|| "in-process".into()),
        kernels: match &args.url {
            None => sgl::engine::cpu::qmat::isa().name().into(),
            Some(_) => "remote".into(),
        },
        weight_formats: formats,
        weight_bytes_per_token: weight_bytes,
        threads,
        bandwidth_gib_s: bw / (1u64 << 30) as f64,
        limit_tok_s: limit,
        prompt_tokens: prompt.prompt_tokens,
        prompt_tok_s,
        prompt_ratio_to_limit: prompt_tok_s / limit,
        prompt_ttft_s: prompt.ttft_s,
        ttft_p50_s: percentile(&all_ttft, 0.5),
        ttft_p95_s: percentile(&all_ttft, 0.95),
        decode: runs,
    };
    print_report(&report);
    write_json(args.json.as_deref(), &report)?;
    Ok(())
}

fn print_report(r: &Report) {
    println!(
        "model            {} ({})",
        r.model,
        r.weight_formats.join(",")
    );
    println!("target           {} (kernels {})", r.target, r.kernels);
    println!(
        "bandwidth        {:.1} GiB/s on {} threads; {:.1} MiB weights/token; limit {:.1} tok/s",
        r.bandwidth_gib_s,
        r.threads,
        r.weight_bytes_per_token as f64 / (1u64 << 20) as f64,
        r.limit_tok_s
    );
    println!(
        "prompt           {} tokens in {:.3}s: {:.0} tok/s ({:.2}x limit)",
        r.prompt_tokens, r.prompt_ttft_s, r.prompt_tok_s, r.prompt_ratio_to_limit
    );
    println!(
        "TTFT (all runs)  p50 {:.1} ms, p95 {:.1} ms",
        r.ttft_p50_s * 1e3,
        r.ttft_p95_s * 1e3
    );
    for d in &r.decode {
        println!(
            "decode x{:<3}     per stream {:.1} tok/s ({:.2}x limit), aggregate {:.1} tok/s ({:.2}x limit), TTFT p50 {:.1} ms p95 {:.1} ms",
            d.streams,
            d.per_stream_tok_s,
            d.per_stream_ratio_to_limit,
            d.aggregate_tok_s,
            d.aggregate_ratio_to_limit,
            d.ttft_p50_s * 1e3,
            d.ttft_p95_s * 1e3
        );
    }
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

enum Workload {
    Chat(String),
    Raw(String),
}

async fn one_stream(target: &Target, w: Workload, max_tokens: u32) -> anyhow::Result<StreamStats> {
    match target {
        Target::Local(engine) => {
            let mut req = match w {
                Workload::Chat(s) => GenerationRequest::chat(vec![ChatMessage::new("user", &s)]),
                Workload::Raw(s) => GenerationRequest::raw(s),
            }
            .max_tokens(max_tokens)
            .temperature(0.0);
            req.ignore_eos = true;
            let t0 = Instant::now();
            let mut rx = engine.submit(req)?;
            let mut first: Option<Duration> = None;
            while let Some(ev) = rx.recv().await {
                match ev {
                    GenerationEvent::Token { .. } => {
                        first.get_or_insert_with(|| t0.elapsed());
                    }
                    GenerationEvent::Done {
                        prompt_tokens,
                        completion_tokens,
                        ..
                    } => {
                        let end = t0.elapsed();
                        let ttft = first.unwrap_or(end);
                        return Ok(StreamStats {
                            prompt_tokens,
                            completion_tokens,
                            ttft_s: ttft.as_secs_f64(),
                            decode_s: (end - ttft).as_secs_f64(),
                            finished_s: end.as_secs_f64(),
                        });
                    }
                    GenerationEvent::Error { message } => bail!("engine: {message}"),
                }
            }
            bail!("the engine ended a stream without Done")
        }
        Target::Remote { client, url, model } => {
            // A raw prompt goes as one user message; close enough for timing.
            let text = match w {
                Workload::Chat(s) | Workload::Raw(s) => s,
            };
            let body = serde_json::json!({
                "model": model,
                "messages": [{"role": "user", "content": text}],
                "max_tokens": max_tokens,
                "temperature": 0,
                "stream": true,
                "stream_options": {"include_usage": true},
                "ignore_eos": true,
            });
            let t0 = Instant::now();
            let resp = client
                .post(format!("{url}{}", routes::CHAT_COMPLETIONS))
                .json(&body)
                .send()
                .await?
                .error_for_status()?;
            let mut stream = resp.bytes_stream();
            let mut buf = Vec::new();
            let mut first: Option<Duration> = None;
            let mut usage = (0u32, 0u32);
            while let Some(chunk) = stream.next().await {
                buf.extend_from_slice(&chunk?);
                while let Some(pos) = buf.windows(2).position(|w| w == b"\n\n") {
                    let event: Vec<u8> = buf.drain(..pos + 2).collect();
                    let line = String::from_utf8_lossy(&event);
                    let Some(data) = line.trim().strip_prefix("data:") else {
                        continue;
                    };
                    let data = data.trim();
                    if data == "[DONE]" {
                        continue;
                    }
                    let v: serde_json::Value = serde_json::from_str(data)?;
                    if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
                        usage = (
                            u["prompt_tokens"].as_u64().unwrap_or(0) as u32,
                            u["completion_tokens"].as_u64().unwrap_or(0) as u32,
                        );
                    }
                    let has_text = v["choices"][0]["delta"]["content"]
                        .as_str()
                        .is_some_and(|s| !s.is_empty());
                    if has_text {
                        first.get_or_insert_with(|| t0.elapsed());
                    }
                }
            }
            let end = t0.elapsed();
            let ttft = first.unwrap_or(end);
            Ok(StreamStats {
                prompt_tokens: usage.0,
                completion_tokens: usage.1,
                ttft_s: ttft.as_secs_f64(),
                decode_s: (end - ttft).as_secs_f64(),
                finished_s: end.as_secs_f64(),
            })
        }
    }
}

#[derive(Debug, Serialize)]
struct LatencyRun {
    url: String,
    requests: usize,
    concurrency: usize,
    p50_ms: f64,
    p99_ms: f64,
    /// The slowest request.
    max_ms: f64,
    mean_ms: f64,
    requests_per_s: f64,
}

#[derive(Debug, Serialize)]
struct CompareRun {
    concurrency: usize,
    direct: LatencyRun,
    compared: LatencyRun,
    added_p50_ms: f64,
    added_p99_ms: f64,
}

#[derive(Debug, Serialize)]
struct CompareReport {
    model: String,
    max_tokens: u32,
    runs: Vec<CompareRun>,
}

/// The model an OpenAI-compatible server lists first.
async fn first_model(
    client: &reqwest::Client,
    base: &str,
    key: Option<&str>,
) -> anyhow::Result<String> {
    let mut req = client.get(format!("{base}{}", routes::MODELS));
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    let models: serde_json::Value = req
        .send()
        .await
        .with_context(|| format!("cannot reach {base}"))?
        .error_for_status()?
        .json()
        .await?;
    Ok(models["data"][0]["id"]
        .as_str()
        .with_context(|| format!("{base} lists no model"))?
        .to_string())
}

/// `requests` plain non-stream chat completions at `concurrency`; each must
/// answer 2xx.
async fn latency_run(
    client: &reqwest::Client,
    base: &str,
    key: Option<&str>,
    model: &str,
    args: &BenchArgs,
    concurrency: usize,
) -> anyhow::Result<LatencyRun> {
    let url = format!("{base}{}", routes::CHAT_COMPLETIONS);
    let body = serde_json::json!({
        "model": model,
        "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": args.max_tokens,
        "temperature": 0.0,
        "stream": false,
    });
    let url = url.as_str();
    let one = || {
        let mut req = client.post(url).json(&body);
        if let Some(k) = key {
            req = req.bearer_auth(k);
        }
        async move {
            let t = Instant::now();
            let resp = req.send().await.context("request failed")?;
            let status = resp.status();
            let text = resp.text().await.context("reading the answer")?;
            if !status.is_success() {
                bail!("{url} answered {status}: {text}");
            }
            Ok::<f64, anyhow::Error>(t.elapsed().as_secs_f64())
        }
    };
    // Warm the connections first; not counted.
    for _ in 0..concurrency.min(4) {
        one().await?;
    }
    let start = Instant::now();
    let mut times: Vec<f64> = futures_util::stream::iter((0..args.requests).map(|_| one()))
        .buffer_unordered(concurrency)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<anyhow::Result<_>>()?;
    let wall = start.elapsed().as_secs_f64();
    times.sort_by(f64::total_cmp);
    let mean = times.iter().sum::<f64>() / times.len().max(1) as f64;
    Ok(LatencyRun {
        url: base.to_string(),
        requests: args.requests,
        concurrency,
        p50_ms: percentile(&times, 0.5) * 1e3,
        p99_ms: percentile(&times, 0.99) * 1e3,
        max_ms: times.last().copied().unwrap_or_default() * 1e3,
        mean_ms: mean * 1e3,
        requests_per_s: args.requests as f64 / wall,
    })
}

/// `--url` against `--compare-url`: the same plain requests to both, at
/// each concurrency.
async fn compare(args: &BenchArgs, url: &str, other: &str) -> anyhow::Result<()> {
    if args.requests == 0 {
        bail!("--requests must be at least 1");
    }
    let client = reqwest::Client::new();
    let direct_base = url.trim_end_matches('/').to_string();
    let other_base = other.trim_end_matches('/').to_string();
    let key = args.api_key.as_deref();
    // The node names the model; the coordinator must route that same id.
    let model = first_model(&client, &direct_base, None).await?;
    let mut runs = Vec::new();
    for &c in &args.concurrency {
        let concurrency = c.max(1);
        eprintln!(
            "{} plain requests of {model} (max_tokens {}, concurrency {concurrency}) to each endpoint…",
            args.requests, args.max_tokens
        );
        let direct = latency_run(&client, &direct_base, None, &model, args, concurrency).await?;
        let compared = latency_run(&client, &other_base, key, &model, args, concurrency).await?;
        runs.push(CompareRun {
            concurrency,
            added_p50_ms: compared.p50_ms - direct.p50_ms,
            added_p99_ms: compared.p99_ms - direct.p99_ms,
            direct,
            compared,
        });
    }
    let report = CompareReport {
        model,
        max_tokens: args.max_tokens,
        runs,
    };
    println!(
        "{:<40} {:>5} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "endpoint", "conc", "p50 ms", "p99 ms", "max ms", "mean ms", "req/s"
    );
    for run in &report.runs {
        for r in [&run.direct, &run.compared] {
            println!(
                "{:<40} {:>5} {:>10.2} {:>10.2} {:>10.2} {:>10.2} {:>10.1}",
                r.url, r.concurrency, r.p50_ms, r.p99_ms, r.max_ms, r.mean_ms, r.requests_per_s
            );
        }
        println!(
            "added by {} at concurrency {}: p50 {:+.2} ms, p99 {:+.2} ms",
            run.compared.url, run.concurrency, run.added_p50_ms, run.added_p99_ms
        );
    }
    write_json(args.json.as_deref(), &report)?;
    Ok(())
}

/// One multi-turn run (with or without the prefix cache).
#[derive(Debug, Serialize)]
struct MultiTurnRun {
    prefix_cache_mb: u64,
    /// p50 TTFT of each turn over the conversations, seconds.
    ttft_p50_s: Vec<f64>,
    /// Mean prompt tokens of each turn.
    prompt_tokens: Vec<f64>,
    /// Mean prompt tokens the cache supplied, per turn.
    cached_tokens: Vec<f64>,
    /// p50 TTFT over every conversation's turns from the third on.
    ttft_p50_from_turn3_s: f64,
    prefix_cache_hits: u64,
    prefix_cache_lookups: u64,
    wall_s: f64,
}

#[derive(Debug, Serialize)]
struct MultiTurnReport {
    model: String,
    kernels: String,
    conversations: u32,
    turns: u32,
    system_prompt_tokens: usize,
    turn_tokens: u32,
    without_cache: MultiTurnRun,
    with_cache: MultiTurnRun,
    /// Without over with, p50 TTFT from the third turn on.
    ttft_speedup_from_turn3: f64,
    /// Whether every reply was the same text in both runs (greedy decoding,
    /// and the cache changes no logits).
    same_replies: bool,
}

const QUESTIONS: &[&str] = &[
    "Which zone is the cheapest to ship to?",
    "And how long does a parcel take to get there?",
    "Can I send a parcel of twelve kilograms?",
    "What if it is fragile?",
    "Summarise what you told me so far.",
    "Which day should I bring it in?",
    "Is there a discount for regular customers?",
    "How do I track the parcel?",
    "What happens if nobody is home?",
    "Thank you, that is all.",
];

/// A system prompt of at least `tokens` tokens (as the engine's tokenizer
/// counts them).
fn system_prompt(engine: &EngineHandle, tokens: usize) -> anyhow::Result<(String, usize)> {
    let mut s = String::from(
        "You are the assistant of a parcel shipping company. Answer in one or two sentences. ",
    );
    let mut i = 0u32;
    loop {
        let n = engine.tokenizer().encode(&s)?.len();
        if n >= tokens {
            return Ok((s, n));
        }
        s.push_str(&format!(
            "Rule {i}: parcels to zone {i} leave on day {} of the week, cost {} euros per \
             kilogram and may weigh up to {} kilograms. ",
            i % 7 + 1,
            i % 9 + 2,
            10 + i % 5 * 5
        ));
        i += 1;
    }
}

/// One conversation's turns: (TTFT seconds, prompt tokens, cached tokens,
/// reply) each.
async fn conversation(
    engine: &EngineHandle,
    system: &str,
    c: u32,
    args: &BenchArgs,
) -> anyhow::Result<Vec<(f64, u32, u32, String)>> {
    let mut messages = vec![ChatMessage::new("system", system)];
    let mut out = Vec::new();
    for t in 0..args.turns {
        let q = QUESTIONS[t as usize % QUESTIONS.len()];
        messages.push(ChatMessage::new("user", &format!("(Customer {c}) {q}")));
        let req = GenerationRequest::chat(messages.clone())
            .max_tokens(args.turn_tokens)
            .temperature(0.0);
        let t0 = Instant::now();
        let mut rx = engine.submit(req)?;
        let mut first: Option<Duration> = None;
        let mut text = String::new();
        let done = loop {
            match rx.recv().await {
                Some(GenerationEvent::Token { text: t, .. }) => {
                    first.get_or_insert_with(|| t0.elapsed());
                    text.push_str(&t);
                }
                Some(GenerationEvent::Done {
                    prompt_tokens,
                    cached_tokens,
                    ..
                }) => break (prompt_tokens, cached_tokens),
                Some(GenerationEvent::Error { message }) => bail!("engine: {message}"),
                None => bail!("the engine ended a stream without Done"),
            }
        };
        let ttft = first.unwrap_or_else(|| t0.elapsed()).as_secs_f64();
        out.push((ttft, done.0, done.1, text.clone()));
        messages.push(ChatMessage::new("assistant", &text));
    }
    Ok(out)
}

/// `--multi-turn`: the same chats without and with the prefix cache, one
/// engine after the other in this process.
async fn multi_turn(args: &BenchArgs) -> anyhow::Result<()> {
    let base = args.engine.to_config()?;
    let budget = base.prefix_cache_bytes;
    if budget == 0 {
        bail!("--multi-turn compares against the prefix cache: give --prefix-cache-mb above 0");
    }
    let mut runs = Vec::new();
    let mut replies = Vec::new();
    let mut meta = None;
    for bytes in [0, budget] {
        let mut cfg = base.clone();
        cfg.prefix_cache_bytes = bytes;
        eprintln!(
            "loading {} (prefix cache {} MiB)…",
            cfg.model.display(),
            bytes >> 20
        );
        let engine = tokio::task::spawn_blocking(move || Engine::load(cfg)).await??;
        let (system, system_tokens) = system_prompt(&engine, args.system_tokens as usize)?;
        // Warm up: page in the weights, start the threads (a prompt that
        // shares nothing with the chats).
        let target = Target::Local(engine.clone());
        let _ = one_stream(&target, Workload::Raw(STORY.into()), 4).await?;
        drop(target);
        let (hits0, lookups0) = prefix_counters(&engine);
        eprintln!(
            "{} conversations of {} turns, system prompt {system_tokens} tokens…",
            args.conversations, args.turns
        );
        let t0 = Instant::now();
        let convs = (0..args.conversations).map(|c| conversation(&engine, &system, c, args));
        let all: Vec<_> = futures_util::future::join_all(convs)
            .await
            .into_iter()
            .collect::<anyhow::Result<_>>()?;
        let wall = t0.elapsed().as_secs_f64();
        let (hits1, lookups1) = prefix_counters(&engine);
        let turns = args.turns as usize;
        let mut ttft_p50 = Vec::with_capacity(turns);
        let mut prompt = Vec::with_capacity(turns);
        let mut cached = Vec::with_capacity(turns);
        let mut late = Vec::new();
        for t in 0..turns {
            let mut ttft: Vec<f64> = all.iter().map(|c| c[t].0).collect();
            if t >= 2 {
                late.extend(ttft.iter().copied());
            }
            ttft.sort_by(f64::total_cmp);
            ttft_p50.push(percentile(&ttft, 0.5));
            let n = all.len().max(1) as f64;
            prompt.push(all.iter().map(|c| f64::from(c[t].1)).sum::<f64>() / n);
            cached.push(all.iter().map(|c| f64::from(c[t].2)).sum::<f64>() / n);
        }
        late.sort_by(f64::total_cmp);
        replies.push(
            all.iter()
                .map(|c| c.iter().map(|t| t.3.clone()).collect::<Vec<_>>())
                .collect::<Vec<_>>(),
        );
        meta.get_or_insert((engine.info().id.clone(), system_tokens));
        runs.push(MultiTurnRun {
            prefix_cache_mb: bytes >> 20,
            ttft_p50_s: ttft_p50,
            prompt_tokens: prompt,
            cached_tokens: cached,
            ttft_p50_from_turn3_s: percentile(&late, 0.5),
            prefix_cache_hits: hits1 - hits0,
            prefix_cache_lookups: lookups1 - lookups0,
            wall_s: wall,
        });
    }
    let (model, system_prompt_tokens) = meta.context("no run")?;
    let with_cache = runs.pop().context("no run with the cache")?;
    let without_cache = runs.pop().context("no run without the cache")?;
    let report = MultiTurnReport {
        model,
        kernels: sgl::engine::cpu::qmat::isa().name().into(),
        conversations: args.conversations,
        turns: args.turns,
        system_prompt_tokens,
        turn_tokens: args.turn_tokens,
        ttft_speedup_from_turn3: without_cache.ttft_p50_from_turn3_s
            / with_cache.ttft_p50_from_turn3_s,
        same_replies: replies.first() == replies.last(),
        without_cache,
        with_cache,
    };
    print_multi_turn(&report);
    write_json(args.json.as_deref(), &report)?;
    Ok(())
}

/// (hits, lookups) of the engine's prefix cache so far.
fn prefix_counters(engine: &EngineHandle) -> (u64, u64) {
    use std::sync::atomic::Ordering;
    let m = engine.metrics();
    (
        m.prefix_cache_hits.load(Ordering::Relaxed),
        m.prefix_cache_lookups.load(Ordering::Relaxed),
    )
}

fn print_multi_turn(r: &MultiTurnReport) {
    let (a, b) = (&r.without_cache, &r.with_cache);
    println!(
        "model            {} (kernels {}); {} conversations x {} turns, system prompt {} tokens, replies up to {} tokens",
        r.model, r.kernels, r.conversations, r.turns, r.system_prompt_tokens, r.turn_tokens
    );
    println!(
        "{:>4} {:>14} {:>16} {:>14} {:>9}",
        "turn", "prompt tokens", "TTFT p50 no cache", "TTFT p50 cache", "cached"
    );
    for t in 0..a.ttft_p50_s.len() {
        println!(
            "{:>4} {:>14.0} {:>14.1} ms {:>11.1} ms {:>9.0}",
            t + 1,
            a.prompt_tokens[t],
            a.ttft_p50_s[t] * 1e3,
            b.ttft_p50_s[t] * 1e3,
            b.cached_tokens[t]
        );
    }
    println!(
        "turns 3+         TTFT p50 {:.1} ms without the cache, {:.1} ms with it: {:.2}x lower",
        a.ttft_p50_from_turn3_s * 1e3,
        b.ttft_p50_from_turn3_s * 1e3,
        r.ttft_speedup_from_turn3
    );
    println!(
        "prefix cache     {} hits of {} lookups; wall {:.1}s without, {:.1}s with; same replies: {}",
        b.prefix_cache_hits, b.prefix_cache_lookups, a.wall_s, b.wall_s, r.same_replies
    );
}

/// Write a report as JSON to `path` (`-` for standard output), if asked.
fn write_json(path: Option<&str>, report: &impl Serialize) -> anyhow::Result<()> {
    let Some(path) = path else { return Ok(()) };
    let s = serde_json::to_string_pretty(report)?;
    if path == "-" {
        println!("{s}");
    } else {
        std::fs::write(path, s + "\n").with_context(|| format!("writing {path}"))?;
    }
    Ok(())
}
