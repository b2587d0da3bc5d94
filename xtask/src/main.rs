//! `cargo xtask`: the one entry for work cargo alone does not do.
//!
//! - `cargo xtask test`: the gate (fmt, clippy), every plain test, then the data-plane and TLS
//!   tests (real sockets, real BPF as root) single-threaded in release, then the data-plane
//!   suite in a VM on Debian's stock kernel, then the kernel TLS tests on a newer Debian kernel
//!   (fetched from trixie-backports into target/vm). Installs the Debian packages it needs
//!   (clang, libbpf-dev, qemu-system-x86, linux-image-amd64, busybox-static) when missing;
//!   fails, never skips, when a prerequisite cannot be had.
//! - `cargo xtask bench [--quick] [--only TARGETS] [--scenario NAME] [--rounds N] [--netns]`: wsplice
//!   against nginx, HAProxy and Apache; `--vm [--newer-kernel]`: the rustls relay against
//!   kernel TLS + splice for wss://, inside the test VM.
//! - `cargo xtask vm [--newer-kernel] SCRIPT`: runs a shell script inside the test VM (Debian's
//!   stock kernel, or the newer one of `vm::newer_kernel`).
//! - `cargo xtask relay-bench`: tokio vs io_uring for the userspace relay, CPU per GB.
//! - `cargo xtask build-ebpf`: compiles ebpf/wsplice.bpf.c to target/bpf/ (build.rs does the
//!   same for the library; this is for inspecting the object, e.g. with bpftool).
#![forbid(unsafe_code)]

mod vm;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{Context, Result, bail};

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// Runs a command to its end (in the workspace unless it names a directory).
fn run(command: &mut Command) -> Result<()> {
    eprintln!("xtask: running {command:?}");
    if command.get_current_dir().is_none() {
        command.current_dir(workspace_root());
    }
    let status = command
        .status()
        .with_context(|| format!("cannot start {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed: {status}");
    }
    Ok(())
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).trim() == "0")
}

/// Debian packages that build the sockmap data plane, by the file that shows each is there.
const BUILD_PACKAGES: [(&str, &str); 3] = [
    ("/usr/bin/clang", "clang"),
    ("/usr/include/bpf/bpf_helpers.h", "libbpf-dev"),
    ("/usr/include/linux/bpf.h", "linux-libc-dev"),
];

/// Installs with apt-get whichever of `packages` (file that shows it, package) is missing, and
/// returns what it installed.
fn install_missing<'a>(packages: &[(&str, &'a str)], purpose: &str) -> Result<Vec<&'a str>> {
    let missing: Vec<&str> = packages
        .iter()
        .filter(|(file, _)| !Path::new(file).exists())
        .map(|(_, package)| *package)
        .collect();
    if missing.is_empty() {
        return Ok(missing);
    }
    if !is_root() {
        bail!(
            "{} missing ({purpose}): install them as root",
            missing.join(" ")
        );
    }
    eprintln!("xtask: installing {} ({purpose})", missing.join(" "));
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    Ok(missing)
}

fn build_ebpf() -> Result<()> {
    install_missing(&BUILD_PACKAGES, "to build the BPF verdict")?;
    let out_dir = workspace_root().join("target/bpf");
    std::fs::create_dir_all(&out_dir)?;
    let arch_include = format!("-I/usr/include/{}-linux-gnu", std::env::consts::ARCH);
    run(Command::new("clang")
        .args([
            "-O2",
            "-g",
            "-target",
            "bpf",
            "-Wall",
            "-Werror",
            &arch_include,
            "-c",
        ])
        .arg("ebpf/wsplice.bpf.c")
        .arg("-o")
        .arg(out_dir.join("wsplice.bpf.o")))?;
    eprintln!("xtask: built target/bpf/wsplice.bpf.o");
    Ok(())
}

fn test() -> Result<()> {
    if !is_root() {
        bail!("the data-plane tests load BPF programs and need root; run `sudo cargo xtask test`");
    }
    install_missing(&BUILD_PACKAGES, "to build the sockmap data plane")?;
    run(cargo().args(["fmt", "--all", "--check"]))?;
    run(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    run(cargo().args(["test", "--workspace"]))?;
    // Real sockets, real BPF and real TLS: one at a time, optimised so gigabytes move in
    // seconds.
    run(cargo().args([
        "test",
        "--release",
        "-p",
        "wsplice-dataplane",
        "--test",
        "dataplane",
        "--test",
        "tls",
        "--test",
        "balancing",
        "--",
        "--ignored",
        "--test-threads=1",
    ]))?;
    vm_tests()
}

/// The quick TLS tests not run in the VM: the reload test signals itself with the kill
/// binary; reloading does not depend on kernel TLS and is proven on the host.
const SKIP_IN_VM: &str = "--skip certificates_reload";

/// The executable cargo built for integration test `name` of the data-plane crate (release).
fn release_test_binary(name: &str) -> Result<PathBuf> {
    let out = cargo()
        .args([
            "test",
            "--release",
            "-p",
            "wsplice-dataplane",
            "--test",
            name,
            "--no-run",
            "--message-format=json",
        ])
        .current_dir(workspace_root())
        .stderr(std::process::Stdio::inherit())
        .output()?;
    if !out.status.success() {
        bail!("building the {name} tests failed");
    }
    let needle = "\"executable\":\"";
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|line| line.contains(&format!("\"name\":\"{name}\"")))
        .find_map(|line| {
            let start = line.find(needle)? + needle.len();
            let end = line[start..].find('"')? + start;
            Some(PathBuf::from(&line[start..end]))
        })
        .with_context(|| format!("cargo named no executable for the {name} tests"))
}

/// In a VM on Debian's stock kernel (6.1): kernel TLS from rustls's secrets for every suite
/// and version, the TLS suite with listeners handing connections to kernel TLS and the splice
/// carrier (WSPLICE_EXPECT_KERNEL_TLS makes it fail rather than pass on the rustls relay), and
/// the data-plane suite on that kernel. Sockmap mode is refused there (it lost stream tails and
/// hit a kernel BUG), so what runs of it is the proof that `auto` falls back with the reason,
/// and the userspace and splice suites.
fn vm_tests() -> Result<()> {
    vm::ensure_packages()?;
    let ktls = release_test_binary("ktls")?;
    let tls = release_test_binary("tls")?;
    let dataplane = release_test_binary("dataplane")?;
    let script = workspace_root().join("target/vm/dataplane-suite.sh");
    std::fs::create_dir_all(script.parent().context("target/vm")?)?;
    std::fs::write(
        &script,
        format!(
            "set -e\ncd '{root}'\nexport WSPLICE_EXPECT_KERNEL_TLS=1\n'{ktls}' --ignored --test-threads=1 --color never --nocapture\n\
             '{tls}' --test-threads=1 --color never {quick_skip}\n\
             '{tls}' --ignored --test-threads=1 --color never --nocapture {heavy_skip}\n\
             '{dataplane}' --ignored --test-threads=1 --color never auto_mode ::userspace ::splice\n",
            root = workspace_root().display(),
            ktls = ktls.display(),
            tls = tls.display(),
            dataplane = dataplane.display(),
            quick_skip = SKIP_IN_VM,
            // A client that closes at once can do so with the proxy's close_notify (sent when
            // the member half-closed) unread; its kernel then answers with a reset, which may
            // discard bytes still queued at the proxy. Under TCG's timing this happens (1 of
            // 10,000); the races are proven through rustls on the host.
            heavy_skip = "--skip ten_thousand",
        ),
    )?;
    let code = vm::run_script(
        &vm::installed_kernel()?,
        &script,
        std::time::Duration::from_secs(900),
    )?;
    if code != 0 {
        bail!("the VM tests failed (exit {code})");
    }
    eprintln!("xtask: the kernel TLS and data-plane tests passed in the VM");
    newer_kernel_tests(&ktls, &tls)
}

/// On a newer Debian kernel (6.14 or later takes new kernel TLS keys): the kernel TLS tests
/// again, where a client's TLS 1.3 key update must be followed with every byte carried.
fn newer_kernel_tests(ktls: &Path, tls: &Path) -> Result<()> {
    let kernel = vm::newer_kernel()?;
    let script = workspace_root().join("target/vm/newer-kernel-suite.sh");
    std::fs::write(
        &script,
        format!(
            "set -e\ncd '{root}'\nexport WSPLICE_EXPECT_KERNEL_TLS=1\n'{ktls}' --ignored --test-threads=1 --color never\n\
             '{tls}' --test-threads=1 --color never {SKIP_IN_VM}\n",
            root = workspace_root().display(),
            ktls = ktls.display(),
            tls = tls.display(),
        ),
    )?;
    let code = vm::run_script(&kernel, &script, std::time::Duration::from_secs(600))?;
    if code != 0 {
        bail!(
            "the kernel TLS tests failed on {} (exit {code})",
            kernel.version
        );
    }
    eprintln!(
        "xtask: the kernel TLS tests passed in the VM on {}",
        kernel.version
    );
    Ok(())
}

/// Runs a shell script inside the test VM (`cargo xtask vm SCRIPT`).
fn vm_script(extra: &[String]) -> Result<()> {
    let newer = extra.iter().any(|arg| arg == "--newer-kernel");
    let script = extra
        .iter()
        .find(|arg| !arg.starts_with("--"))
        .context("usage: cargo xtask vm [--newer-kernel] SCRIPT")?;
    vm::ensure_packages()?;
    let script = std::fs::canonicalize(script)?;
    let kernel = vm::kernel(newer)?;
    let code = vm::run_script(&kernel, &script, std::time::Duration::from_secs(1800))?;
    if code != 0 {
        bail!("the script exited with {code} in the VM");
    }
    Ok(())
}

/// Benchmarks wsplice against nginx, HAProxy and Apache (bench/results/latest.{json,md}).
fn bench(extra: &[String]) -> Result<()> {
    if extra.iter().any(|a| a == "--vm") {
        return bench_in_vm(
            extra.iter().any(|a| a == "--quick"),
            extra.iter().any(|a| a == "--newer-kernel"),
        );
    }
    if !is_root() {
        bail!("the benchmark loads BPF and starts nginx/HAProxy/Apache: run it as root");
    }
    install_missing(&BUILD_PACKAGES, "to build the sockmap data plane")?;
    let peers = [
        ("/usr/sbin/haproxy", "haproxy"),
        ("/usr/sbin/nginx", "nginx"),
        ("/usr/sbin/apache2", "apache2"),
        // --netns turns on veth's NAPI path.
        ("/usr/sbin/ethtool", "ethtool"),
    ];
    // The packages start their default services; the benchmark runs its own.
    for service in install_missing(&peers, "the benchmark's peers")? {
        let _ = Command::new("systemctl").args(["stop", service]).status();
    }
    run(cargo().args(["build", "--release", "-p", "wsplice", "-p", "wsplice-bench"]))?;
    // The load and the echo members on core 1; each target pins itself to core 0.
    run(Command::new("taskset")
        .args(["-c", "1"])
        .arg(workspace_root().join("target/release/wsplice-bench"))
        .args(extra))
}

/// `cargo xtask bench --vm [--newer-kernel]`: wss:// through the rustls relay against kernel
/// TLS + splice, in the test VM (the host kernel has no kernel TLS); results in
/// bench/results/vm-kernel-tls.md (vm-kernel-tls-newer.md on the newer kernel).
fn bench_in_vm(quick: bool, newer: bool) -> Result<()> {
    vm::ensure_packages()?;
    run(cargo().args(["build", "--release", "-p", "wsplice", "-p", "wsplice-bench"]))?;
    let root = workspace_root();
    let script = root.join("target/vm/bench.sh");
    std::fs::create_dir_all(script.parent().context("target/vm")?)?;
    std::fs::write(
        &script,
        format!(
            "set -e\ncd '{root}'\ntaskset -c 1 '{bench}' --kernel-tls-vm{quick}\n",
            root = root.display(),
            bench = root.join("target/release/wsplice-bench").display(),
            quick = if quick { " --quick" } else { "" },
        ),
    )?;
    let kernel = vm::kernel(newer)?;
    let (code, lines) = vm::run_script_collecting(
        &kernel,
        &script,
        std::time::Duration::from_secs(1800),
        Some("WSPLICE-RESULT"),
    )?;
    if code != 0 || lines.is_empty() {
        bail!("the benchmark failed in the VM (exit {code})");
    }
    let results = root.join(if newer {
        "bench/results/vm-kernel-tls-newer.md"
    } else {
        "bench/results/vm-kernel-tls.md"
    });
    // The console drops trailing spaces: an empty line comes without the prefix's space.
    let lines: Vec<&str> = lines
        .iter()
        .map(|line| line.strip_prefix(' ').unwrap_or(line))
        .collect();
    std::fs::write(&results, lines.join("\n") + "\n")?;
    eprintln!("xtask: results in {}", results.display());
    Ok(())
}

/// Measures the userspace relay with tokio and with io_uring (bench/results/relay.md).
fn relay_bench() -> Result<()> {
    run(cargo().args([
        "run",
        "--release",
        "-p",
        "wsplice-dataplane",
        "--example",
        "relay_bench",
        "--",
        "1",
        "5",
    ]))
}

fn main() -> ExitCode {
    let task = std::env::args().nth(1).unwrap_or_default();
    let extra: Vec<String> = std::env::args().skip(2).collect();
    let result = match task.as_str() {
        "bench" => bench(&extra),
        "test" => test(),
        "build-ebpf" => build_ebpf(),
        "relay-bench" => relay_bench(),
        "vm" => vm_script(&extra),
        _ => {
            eprintln!(
                "usage: cargo xtask <test|bench [--quick] [--only TARGETS] [--scenario NAME] [--rounds N] [--netns] [--vm [--newer-kernel]]|vm [--newer-kernel] SCRIPT|build-ebpf|relay-bench>"
            );
            return ExitCode::from(64);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("xtask: {error:#}");
            ExitCode::FAILURE
        }
    }
}
