//! The `tollgate` command line: the main job runs, and bad arguments get a clear message and
//! a non-zero exit.

use std::process::Command;

fn tollgate(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(args)
        .output()
        .expect("run the tollgate binary")
}

/// Runs `tollgate tune ARGS --svg <a temporary file named after tag>`; asserts it succeeded and
/// returns its standard output, its standard error and the plot's path.
fn tune(tag: &str, args: &[&str]) -> (String, String, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("tollgate-cli-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let svg = dir.join("tune.svg");
    let mut all = vec!["tune"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--svg", svg.to_str().unwrap()]);
    let out = tollgate(&all);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (stdout, String::from_utf8_lossy(&out.stderr).into_owned(), svg)
}

#[test]
fn tune_prints_a_table_per_interval_and_writes_the_plot() {
    let (stdout, _, svg) = tune("table", &["--intervals", "50,250", "--seconds", "3", "--nodes", "4"]);
    assert!(
        stdout.contains("sync interval 50 ms") && stdout.contains("sync interval 250 ms"),
        "{stdout}"
    );
    assert_eq!(stdout.matches("uniform").count(), 4, "{stdout}");
    assert_eq!(stdout.matches("80/20").count(), 4, "{stdout}");
    let plot = std::fs::read_to_string(&svg).unwrap();
    assert!(plot.starts_with("<svg") && plot.contains("polyline"), "{plot}");
    std::fs::remove_dir_all(svg.parent().unwrap()).unwrap();
}

#[test]
fn tune_json_prints_one_object_per_case_and_nothing_else_on_stdout() {
    let (stdout, stderr, svg) = tune(
        "json",
        &[
            "--json",
            "--intervals",
            "50,250",
            "--loads",
            "1.5",
            "--seconds",
            "2",
            "--nodes",
            "3",
        ],
    );
    let cases: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON object: {l}: {e}")))
        .collect();
    // Two intervals x one load x two shapes.
    assert_eq!(cases.len(), 4, "{stdout}");
    let mut seen = Vec::new();
    for c in &cases {
        assert_eq!(c["nodes"], 3, "{c}");
        assert_eq!(c["load"], 1.5, "{c}");
        let utilization = c["utilization"].as_f64().expect("utilization");
        assert!(utilization > 0.0 && utilization <= 1.0 + 1e-9, "{c}");
        assert!(c["admitted"].as_u64().unwrap() <= c["offered"].as_u64().unwrap(), "{c}");
        assert!(c["round_trips_per_s"].as_f64().unwrap() > 0.0, "{c}");
        seen.push((
            c["sync_interval_ms"].as_u64().unwrap(),
            c["shape"].as_str().unwrap().to_string(),
        ));
    }
    seen.sort();
    assert_eq!(
        seen,
        [(50, "80/20"), (50, "uniform"), (250, "80/20"), (250, "uniform")].map(|(i, s)| (i, s.to_string()))
    );
    // The plot is still written; its note goes to stderr, and no progress bar is drawn when
    // stderr is not a terminal.
    assert!(stderr.contains("plot written to"), "{stderr}");
    assert!(!stderr.contains('['), "a progress bar on a pipe: {stderr}");
    let plot = std::fs::read_to_string(&svg).unwrap();
    assert!(
        plot.contains("utilization loss") && plot.contains("round trips"),
        "{plot}"
    );
    std::fs::remove_dir_all(svg.parent().unwrap()).unwrap();
}

/// `--slow-keys` runs check_async on the wall clock against the in-process store (no Redis
/// needed) with 100 users at 20 per minute over 4 nodes, and the table carries the check
/// latency beside utilization.
#[test]
fn tune_slow_keys_reports_check_latency_beside_utilization() {
    let (stdout, _, svg) = tune("slow", &["--slow-keys", "--seconds", "2", "--loads", "4"]);
    assert!(
        stdout.contains("4 nodes sharing 20 per 60 s (token_bucket), burst 20 on each of 100 key(s)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("in-process store, wall clock") && stdout.contains("check_async"),
        "{stdout}"
    );
    assert!(stdout.contains("sync interval 100 ms"), "{stdout}");
    assert!(stdout.contains("check p50") && stdout.contains("check p99"), "{stdout}");
    // One row per shape: load, shape, admitted, ideal, over-admitted, utilization, round
    // trips/s, p50 "µs", p99 "µs".
    let rows: Vec<Vec<&str>> = stdout
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|w| w.first() == Some(&"4x"))
        .collect();
    assert_eq!(rows.len(), 2, "{stdout}");
    for w in rows {
        assert_eq!(w.len(), 11, "{w:?}");
        let utilization: f64 = w[5].trim_end_matches('%').parse().unwrap();
        assert!(utilization > 0.0 && utilization <= 100.0, "{w:?}");
        let (p50, p99): (f64, f64) = (w[7].parse().unwrap(), w[9].parse().unwrap());
        assert!(w[8] == "µs" && w[10] == "µs", "{w:?}");
        assert!(p50 > 0.0 && p50 <= p99, "{w:?}");
    }
    std::fs::remove_dir_all(svg.parent().unwrap()).unwrap();
}

/// A flag given beside `--slow-keys` wins over the preset, and the burst follows the points.
#[test]
fn tune_slow_keys_yields_to_flags_given_beside_it() {
    let (stdout, _, svg) = tune(
        "slow-flags",
        &[
            "--slow-keys",
            "--nodes",
            "2",
            "--points",
            "100",
            "--loads",
            "4",
            "--seconds",
            "0.5",
        ],
    );
    assert!(
        stdout.contains("2 nodes sharing 100 per 60 s (token_bucket), burst 100 on each of 100 key(s)"),
        "{stdout}"
    );
    assert!(stdout.contains("check p99") && !stdout.contains("1.5x"), "{stdout}");
    std::fs::remove_dir_all(svg.parent().unwrap()).unwrap();
}

/// `--async --json`: every case's object has the latency fields, in order, beside a sane
/// utilization.
#[test]
fn tune_async_json_has_the_check_latency_of_each_case() {
    let (stdout, _, svg) = tune(
        "async",
        &[
            "--async",
            "--json",
            "--intervals",
            "50",
            "--loads",
            "1.5",
            "--seconds",
            "2",
            "--nodes",
            "3",
            "--keys",
            "20",
            "--points",
            "100",
        ],
    );
    let cases: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON object: {l}: {e}")))
        .collect();
    assert_eq!(cases.len(), 2, "{stdout}");
    for c in &cases {
        assert_eq!(c["check"], "async", "{c}");
        assert_eq!(c["store"], "in-process store, wall clock", "{c}");
        let utilization = c["utilization"].as_f64().expect("utilization");
        assert!(utilization > 0.0 && utilization <= 1.01, "{c}");
        assert!(c["admitted"].as_u64().unwrap() <= c["offered"].as_u64().unwrap(), "{c}");
        let p50 = c["check_p50_us"].as_f64().expect("check_p50_us");
        let p99 = c["check_p99_us"].as_f64().expect("check_p99_us");
        assert!(p50 > 0.0 && p50 <= p99, "{c}");
    }
    std::fs::remove_dir_all(svg.parent().unwrap()).unwrap();
}

#[test]
fn bad_arguments_get_a_clear_message_and_a_non_zero_exit() {
    for (args, want) in [
        (&["tune", "--nodes", "2.7"][..], "invalid value '2.7' for '--nodes <N>'"),
        (&["tune", "--nodes", "-3"][..], "-3 is not in 1..=1000"),
        (&["tune", "--nodes", "0"][..], "0 is not in 1..=1000"),
        (
            &["tune", "--intervals", "10,x"][..],
            "invalid value 'x' for '--intervals <LIST>'",
        ),
        (&["tune", "--intervals", "10,-50"][..], "-50 is not in 1..=60000"),
        (&["tune", "--loads", "1.5,-2"][..], "-2 is not in (0, 1000]"),
        (&["tune", "--loads", "nan"][..], "NaN is not in (0, 1000]"),
        (&["tune", "--seconds", "0"][..], "0 is not in (0, 3600]"),
        (
            &["tune", "--algorithm", "leaky"][..],
            "possible values: token_bucket, sliding_window, fixed_window",
        ),
        (&["tune", "--points", "0"][..], "expected a whole number of at least 1"),
        (
            &["tune", "--points", "2.5"][..],
            "expected a whole number of at least 1",
        ),
        (&["tune", "--burst", "-1"][..], "expected a whole number of at least 1"),
        (&["tune", "--keys", "0"][..], "0 is not in 1..=1000000"),
        (
            &["tune", "--cold-start", "optimistic:x"][..],
            "expected deny or optimistic:N",
        ),
        (
            &["tune", "--points", "18446744073709551615", "--duration-s", "0.001"][..],
            "policy: ",
        ),
        (
            &["tune", "--redis", "redis://a", "--redis-cluster", "redis://b"][..],
            "cannot be used with",
        ),
        (&["tune", "--frobnicate"][..], "unexpected argument '--frobnicate'"),
        (&["tune", "--seconds"][..], "a value is required for '--seconds <S>'"),
        (&["launch"][..], "unrecognized subcommand 'launch'"),
        (&[][..], "Usage: tollgate <COMMAND>"),
    ] {
        let out = tollgate(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(want), "{args:?}: {stderr}");
        assert!(out.stdout.is_empty(), "{args:?}: nothing on stdout");
    }
}

#[test]
fn each_subcommand_has_its_own_help() {
    let help = tollgate(&["tune", "--help"]);
    assert!(help.status.success());
    let usage = String::from_utf8_lossy(&help.stdout);
    assert!(usage.contains("Usage: tollgate tune [OPTIONS]"), "{usage}");
    for flag in [
        "--nodes <N>",
        "--intervals <LIST>",
        "--json",
        "--redis <URL>",
        "needs the `redis` feature",
        "--async",
        "--slow-keys",
    ] {
        assert!(usage.contains(flag), "{flag} missing from:\n{usage}");
    }
    let top = tollgate(&["--help"]);
    assert!(top.status.success());
    let top = String::from_utf8_lossy(&top.stdout);
    assert!(
        top.contains("tune") && top.contains("Usage: tollgate <COMMAND>"),
        "{top}"
    );
}

/// `tollgate check-config FILE`: the shipped tiers file is valid and its limits are listed; a
/// broken one gets every problem as a `path: reason` line and exit status 1; a missing file 2.
#[cfg(feature = "http")]
#[test]
fn check_config_validates_a_tiers_file_and_names_every_problem() {
    let ok = tollgate(&[
        "check-config",
        concat!(env!("CARGO_MANIFEST_DIR"), "/rate-limit-tiers.json"),
    ]);
    let out = String::from_utf8_lossy(&ok.stdout);
    assert!(ok.status.success(), "{out}\n{}", String::from_utf8_lossy(&ok.stderr));
    assert!(out.contains(": ok"), "{out}");
    for expected in ["anonymous", "enterprise", "POST /api/ai/generate", "10 per 3600 s"] {
        assert!(out.contains(expected), "{expected:?} missing from:\n{out}");
    }
    let dir = std::env::temp_dir().join(format!("tollgate-check-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.json");
    std::fs::write(
        &bad,
        r#"{"tiers": {"free": {"points": -5, "duration": 60}, "pro": {"points": 10}}}"#,
    )
    .unwrap();
    let err = tollgate(&["check-config", bad.to_str().unwrap()]);
    let msg = String::from_utf8_lossy(&err.stderr);
    assert_eq!(err.status.code(), Some(1), "{msg}");
    assert!(msg.contains("tiers.free.points: must be > 0"), "{msg}");
    assert!(msg.contains("tiers.pro.duration: missing"), "{msg}");
    let missing = tollgate(&["check-config", dir.join("absent.json").to_str().unwrap()]);
    assert_eq!(missing.status.code(), Some(2));
    std::fs::remove_dir_all(&dir).unwrap();
}
