//! `spore bench dag`, and the DAG steps the demo and `spore bench xpu` share: deploying DAG
//! files, running a DAG with timing, reading its hops.

use std::path::Path;
use std::time::Instant;

use anyhow::Result;
use spore_client::{read_manifest, Client};

use super::report::{host_meta, plot, save_and_print};
use super::setup::{function_dirs, Daemon};
use super::RunOptions;
use crate::Series;

/// Deploys the functions under `dir` and the DAG files (`*.toml`) in it; returns the DAGs'
/// names.
pub(crate) fn deploy_dags(client: &Client, dir: &Path) -> Result<Vec<String>> {
    for f in function_dirs(dir)? {
        client.deploy_dir(&f, &read_manifest(&f)?)?;
    }
    let mut dags = Vec::new();
    for e in std::fs::read_dir(dir)?.flatten() {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "toml") {
            let text = std::fs::read_to_string(&p)?;
            let spec = spore_core::dag::DagSpec::from_toml(&text)
                .map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
            client.put_dag(&text)?;
            dags.push(spec.name);
        }
    }
    dags.sort();
    Ok(dags)
}

/// Invokes a DAG with timing: (request to response at the client, ms; the answer).
pub(crate) fn dag_run(
    client: &Client,
    name: &str,
    input: &serde_json::Value,
    transport: &str,
) -> Result<(f64, serde_json::Value)> {
    let t0 = Instant::now();
    let (body, failed) =
        client.invoke_dag(name, input.to_string().into_bytes(), Some(transport), true)?;
    let ms = t0.elapsed().as_secs_f64() * 1000.0;
    let v: serde_json::Value = serde_json::from_slice(&body)?;
    anyhow::ensure!(!failed, "DAG {name} over {transport} failed: {v}");
    Ok((ms, v))
}

/// The hops (ms) in a timed DAG answer, of every node or of one.
pub(crate) fn dag_hops(v: &serde_json::Value, node: Option<&str>) -> Vec<f64> {
    v["Timing"]["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|x| node.is_none_or(|id| x["node"] == id))
        .filter_map(|x| x["hop_us"].as_f64())
        .map(|us| us / 1000.0)
        .collect()
}

/// The parts of each hop in a timed DAG answer (pipeline nodes report them), ms: the
/// producer's encode and send (its handler's end to its send returning), the consumer's
/// wake-up, receive and decode (that send to the consumer's input in hand), and the runtime's
/// call set-up (input in hand to the handler starting).
pub(crate) fn hop_parts(v: &serde_json::Value) -> [Vec<f64>; 3] {
    let mut parts: [Vec<f64>; 3] = Default::default();
    let nodes: Vec<&serde_json::Value> = v["Timing"]["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .collect();
    for pair in nodes.windows(2) {
        let (a, b) = (pair[0], pair[1]);
        let f = |x: &serde_json::Value, k: &str| x[k].as_f64();
        let (Some(end), Some(sent), Some(inputs), Some(start)) = (
            f(a, "handler_end_us"),
            f(a, "sent_us"),
            f(b, "inputs_us"),
            f(b, "handler_start_us"),
        ) else {
            continue;
        };
        if f(b, "hop_us").is_none() {
            continue;
        }
        for (i, us) in [sent - end, inputs - sent, start - inputs]
            .into_iter()
            .enumerate()
        {
            parts[i].push(us / 1000.0);
        }
    }
    parts
}

/// Series name of the floor under a 1 KiB DAG hop.
const HOP_FLOOR: &str = "floor: wake an idle thread + json encode/decode 1 KiB";

/// `spore bench dag`.
pub fn run(endpoint: Option<&str>, opts: &RunOptions) -> Result<()> {
    let (n, out, functions) = (opts.n, &opts.out, &opts.functions);
    let daemon = Daemon::for_run(endpoint, "bench")?;
    let client = &daemon.client;
    let dags = deploy_dags(client, functions)?;
    let run = |name: &str, input: &serde_json::Value, transport: &str| {
        dag_run(client, name, input, transport)
    };
    let hops = dag_hops;
    // 1. Hop latency: every hop of the 10-function pychain, 1 KiB payload.
    eprintln!("   hop latency: pychain (10 functions, 1 KiB), {n} runs per transport");
    let pad = serde_json::json!({"n": 0, "pad": "x".repeat(1000)});
    let mut series = Vec::new();
    let mut parts: [Vec<f64>; 3] = Default::default();
    for transport in ["shm", "http"] {
        for _ in 0..3 {
            run("pychain", &pad, transport)?; // warm the instances
        }
        let mut s = Vec::new();
        for _ in 0..n {
            let v = run("pychain", &pad, transport)?.1;
            s.extend(hops(&v, None));
            if transport == "shm" {
                for (all, one) in parts.iter_mut().zip(hop_parts(&v)) {
                    all.extend(one);
                }
            }
        }
        series.push(Series {
            name: format!("{transport} hop, 1 KiB"),
            samples_ms: s,
        });
    }
    // The floor under a 1 KiB hop: waking the sleeping consumer, plus the runtime's own
    // encode (producer) and decode (consumer) of the value, measured here in the same run.
    eprintln!("   floor: {n} x (wake an idle thread + json encode and decode of 1 KiB)");
    let samples = series[0].samples_ms.len().max(n);
    let wake = crate::floor::idle_wakeups(samples)?;
    let codec = crate::floor::json_codec(spore_runtime::PYTHON_INTERPRETER, samples, 1000)?;
    series.push(crate::floor::composite(HOP_FLOOR, &[&wake, &codec]));
    let mut table = crate::table_with_floor(&series, "http hop, 1 KiB", Some(HOP_FLOOR));
    if !parts[0].is_empty() {
        table.push_str(&format!(
            "\nWhere a shm hop goes ({} hops):\n\n| part | p50 | p99 | what |\n|---|---:|---:|---|\n",
            parts[0].len()
        ));
        let what = [
            ("encode + send", "producer: JSON encode, ring write, waking the consumer (its handler's end to its send returning)"),
            ("wake + receive", "consumer: wake-up, ring read, JSON decode (the producer's send to the input in hand)"),
            ("call set-up", "consumer: the runtime's call set-up (input in hand to its handler starting)"),
        ];
        for (p, (name, what)) in parts.iter().zip(what) {
            let sm = crate::summarize(p);
            table.push_str(&format!(
                "| {name} | {:.0} us | {:.0} us | {what} |\n",
                sm.p50 * 1000.0,
                sm.p99 * 1000.0
            ));
        }
    }
    // 2. Payload sweep, shm only, with memcpy of the same size in this process.
    eprintln!("   payload sweep: 1 KiB .. 64 MiB, producer to consumer");
    table.push_str("\nPayload hop (median of the runs; hop = producer's handler returns -> consumer's handler starts with the payload in hand):\n\n| size | mode | runs | hop | GB/s | memcpy | GB/s | hop / memcpy bandwidth |\n|---:|---|---:|---:|---:|---:|---:|---:|\n");
    let mut sweep = Vec::new();
    for size in [1usize << 10, 64 << 10, 1 << 20, 16 << 20, 64 << 20] {
        let k = if size >= 16 << 20 { 5 } else { 15 };
        let src = vec![7u8; size];
        let mut dst = vec![0u8; size];
        let mut copies: Vec<f64> = (0..k)
            .map(|_| {
                let t0 = Instant::now();
                dst.copy_from_slice(std::hint::black_box(&src));
                std::hint::black_box(&dst);
                t0.elapsed().as_secs_f64() * 1000.0
            })
            .collect();
        copies.sort_by(f64::total_cmp);
        let memcpy = copies[k / 2];
        for mode in ["buffer", "bytes"] {
            let input = serde_json::json!({"size": size, "mode": mode});
            run("payload", &input, "shm")?;
            // A run whose node timing came too late (a loaded host) reports no hop: run
            // again, a bounded number of times, until there are k.
            let mut hs: Vec<f64> = Vec::new();
            let mut runs = 0;
            while hs.len() < k && runs < 3 * k {
                runs += 1;
                hs.extend(hops(&run("payload", &input, "shm")?.1, Some("sink")));
            }
            anyhow::ensure!(
                !hs.is_empty(),
                "payload sweep, {size} bytes ({mode}): none of {runs} runs reported the sink's hop timing"
            );
            hs.sort_by(f64::total_cmp);
            let hop = hs[hs.len() / 2];
            let gbps = |ms: f64| size as f64 / (ms / 1000.0) / 1e9;
            table.push_str(&format!(
                "| {} KiB | {mode} | {k} | {hop:.3} ms | {:.2} | {memcpy:.3} ms | {:.2} | {:.0}% |\n",
                size >> 10, gbps(hop), gbps(memcpy), 100.0 * gbps(hop) / gbps(memcpy)
            ));
            sweep.push(
                serde_json::json!({"size": size, "mode": mode, "hop_ms": hop, "memcpy_ms": memcpy}),
            );
        }
    }
    // 3. End to end, each workload, shm vs http, client-side request to response.
    table.push_str("\nEnd to end, request to response at the client (warm instances):\n\n| DAG | n | shm p50 | shm p99 | http p50 | http p99 | http / shm (p50) |\n|---|---:|---:|---:|---:|---:|---:|\n");
    let inputs = [
        (
            "chain2",
            serde_json::json!({"n": 0, "pad": "x".repeat(1000)}),
        ),
        (
            "chain5",
            serde_json::json!({"n": 0, "pad": "x".repeat(1000)}),
        ),
        (
            "fanout",
            serde_json::json!({"n": 0, "pad": "x".repeat(1000)}),
        ),
        (
            "fanin",
            serde_json::json!({"n": 0, "pad": "x".repeat(1000)}),
        ),
        (
            "pychain",
            serde_json::json!({"n": 0, "pad": "x".repeat(1000)}),
        ),
        (
            "alexa",
            serde_json::json!({"user": "ann", "utterance": "open the door, lights on, watch TV"}),
        ),
        (
            "wordcount",
            serde_json::json!({"words": 20000, "parts": 4, "seed": 7}),
        ),
    ];
    for (name, input) in &inputs {
        eprintln!("   end to end: {name}");
        let mut per = Vec::new();
        for transport in ["shm", "http"] {
            for _ in 0..3 {
                run(name, input, transport)?;
            }
            let s: Vec<f64> = (0..n)
                .map(|_| run(name, input, transport).map(|r| r.0))
                .collect::<Result<_>>()?;
            per.push(crate::summarize(&s));
            series.push(Series {
                name: format!("{name} e2e {transport}"),
                samples_ms: s,
            });
        }
        table.push_str(&format!(
            "| {name} | {n} | {:.3} ms | {:.3} ms | {:.3} ms | {:.3} ms | {:.1}x |\n",
            per[0].p50,
            per[0].p99,
            per[1].p50,
            per[1].p99,
            per[1].p50 / per[0].p50
        ));
    }
    // Hops and whole runs differ by an order of magnitude: one plot each.
    let (hop, e2e): (Vec<Series>, Vec<Series>) = series
        .iter()
        .cloned()
        .partition(|s| s.name.contains(" hop") || s.name.starts_with("floor"));
    let png = out.join("dag").join("dag-e2e.png");
    save_and_print(
        out,
        "dag",
        &series,
        &table,
        host_meta(serde_json::json!({ "n": n, "dags": dags, "sweep": sweep })),
        (
            "DAG hop latency (1 KiB), shm vs http through the gateway",
            &hop,
        ),
    )?;
    plot(&png, "DAG end to end, shm vs http", &e2e);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_parts_split_each_hop() {
        let v = serde_json::json!({"Timing": {"nodes": [
            {"node": "a", "handler_end_us": 100.0, "sent_us": 150.0, "hop_us": null},
            {"node": "b", "inputs_us": 210.0, "handler_start_us": 220.0, "handler_end_us": 230.0, "sent_us": 260.0, "hop_us": 120.0},
            {"node": "c", "inputs_us": 300.0, "handler_start_us": 305.0, "hop_us": 75.0}
        ]}});
        let [send, wake, call] = hop_parts(&v);
        assert_eq!(send, vec![0.05, 0.03]);
        assert_eq!(wake, vec![0.06, 0.04]);
        assert_eq!(call, vec![0.01, 0.005]);
    }

    #[test]
    fn hops_of_every_node_or_one() {
        let v = serde_json::json!({"Timing": {"nodes": [
            {"node": "a", "hop_us": null},
            {"node": "b", "hop_us": 1500.0},
            {"node": "c", "hop_us": 250.0},
        ]}});
        assert_eq!(dag_hops(&v, None), vec![1.5, 0.25]);
        assert_eq!(dag_hops(&v, Some("c")), vec![0.25]);
        assert!(dag_hops(&v, Some("a")).is_empty());
        assert!(dag_hops(&serde_json::json!({}), None).is_empty());
    }
}
