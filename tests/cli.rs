//! The `tollgate` command line: the main job runs, and bad arguments get a clear message and
//! a non-zero exit.

use std::process::Command;

fn tollgate(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(args)
        .output()
        .expect("run the tollgate binary")
}

#[test]
fn tune_prints_a_table_per_interval_and_writes_the_plot() {
    let dir = std::env::temp_dir().join(format!("tollgate-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let svg = dir.join("tune.svg");
    let out = tollgate(&[
        "tune",
        "--intervals",
        "50,250",
        "--seconds",
        "3",
        "--nodes",
        "4",
        "--svg",
        svg.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("sync interval 50 ms") && stdout.contains("sync interval 250 ms"),
        "{stdout}"
    );
    assert_eq!(stdout.matches("uniform").count(), 4, "{stdout}");
    assert_eq!(stdout.matches("80/20").count(), 4, "{stdout}");
    let plot = std::fs::read_to_string(&svg).unwrap();
    assert!(plot.starts_with("<svg") && plot.contains("polyline"), "{plot}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_arguments_get_a_clear_message_and_a_non_zero_exit() {
    for (args, want) in [
        (&["tune", "--nodes", "0"][..], "--nodes: must be in 1..=1000"),
        (
            &["tune", "--intervals", "10,x"][..],
            "--intervals: expected a comma-separated list",
        ),
        (&["tune", "--algorithm", "leaky"][..], "unknown algorithm 'leaky'"),
        (&["tune", "--points", "0"][..], "policy: points: must be > 0"),
        (&["tune", "--frobnicate"][..], "unknown option '--frobnicate'"),
        (&["tune", "--seconds"][..], "--seconds: missing value"),
        (&["launch"][..], "unknown command 'launch'"),
        (&[][..], "missing command"),
    ] {
        let out = tollgate(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(want), "{args:?}: {stderr}");
        assert!(
            stderr.contains("usage: tollgate tune"),
            "{args:?}: the usage follows the message"
        );
    }
    let help = tollgate(&["tune", "--help"]);
    assert!(help.status.success());
    let usage = String::from_utf8_lossy(&help.stdout);
    assert!(
        usage.starts_with("usage: tollgate tune") && usage.contains("--redis URL"),
        "{usage}"
    );
}
