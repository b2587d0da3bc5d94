//! Builds ebpf/wsplice.bpf.c with clang. Without clang the object is left empty and wsplice
//! runs with the userspace relay, saying so in one start-up line.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let source_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../ebpf");
    let source = source_dir.join("wsplice.bpf.c");
    let out =
        PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("wsplice.bpf.o");
    println!("cargo:rerun-if-changed={}", source.display());
    println!(
        "cargo:rerun-if-changed={}",
        source_dir.join("wsplice.h").display()
    );
    println!("cargo:rerun-if-env-changed=CLANG");
    let clang = std::env::var("CLANG").unwrap_or_else(|_| "clang".into());
    let arch_include = format!("-I/usr/include/{}-linux-gnu", std::env::consts::ARCH);
    let status = Command::new(&clang)
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
        .arg(&source)
        .arg("-o")
        .arg(&out)
        .status();
    match status {
        Ok(status) if status.success() => {}
        Ok(status) => panic!("{clang} failed to build {}: {status}", source.display()),
        Err(error) => {
            println!(
                "cargo:warning=BPF verdict not built ({clang}: {error}); install clang and libbpf-dev for the sockmap data plane"
            );
            // Cargo reruns a script while a file it watches is missing; this one never exists,
            // so the object gets built by the first build after clang is installed (watching
            // clang itself would not do: packages keep their files' old times).
            let never_created = out.with_file_name("rerun-until-clang-is-found");
            println!("cargo:rerun-if-changed={}", never_created.display());
            std::fs::write(&out, b"").expect("write an empty BPF object");
        }
    }
}
