//! Tests in a QEMU VM booting Debian's stock kernel (linux-image-amd64), for what this host's
//! kernel cannot show: kernel TLS, and the data plane on another kernel version.
//!
//! The VM gets a tiny initramfs (static busybox and the modules for virtio, 9p and overlayfs)
//! whose init mounts the host's `/` read-only over virtio-9p with a tmpfs overlay on top and
//! chroots into it, so binaries built on the host run inside as they are. The script to run is
//! named on the kernel command line; its exit code comes back as a marker line on the serial
//! console.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::{install_missing, run, workspace_root};

const MARKER: &str = "WSPLICE-VM-EXIT=";

/// Debian packages the VM needs, by the file that shows each is there.
const PACKAGES: [(&str, &str); 4] = [
    ("/usr/bin/qemu-system-x86_64", "qemu-system-x86"),
    ("/bin/busybox", "busybox-static"),
    ("/usr/share/doc/linux-image-amd64", "linux-image-amd64"),
    ("/usr/bin/cpio", "cpio"),
];

/// Modules the initramfs loads, in this order (with what each depends on, first).
const MODULES: [&str; 6] = [
    "virtio_pci",
    "virtio_console",
    "9pnet_virtio",
    "9p",
    "overlay",
    "tls",
];

pub fn ensure_packages() -> Result<()> {
    install_missing(&PACKAGES, "for the VM tests").map(drop)
}

/// A kernel the VM boots: its version, its image, and the directory whose `lib/modules` holds
/// its modules (`/` for an installed one).
pub struct Kernel {
    pub version: String,
    image: PathBuf,
    module_root: PathBuf,
}

/// The newest installed Debian kernel (linux-image-amd64 of the host's release: 6.1).
pub fn installed_kernel() -> Result<Kernel> {
    let mut versions: Vec<String> = std::fs::read_dir("/boot")
        .context("/boot")?
        .filter_map(|entry| entry.ok())
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            let version = name.strip_prefix("vmlinuz-")?.to_string();
            Path::new("/lib/modules")
                .join(&version)
                .exists()
                .then_some(version)
        })
        .collect();
    versions.sort();
    let version = versions
        .pop()
        .context("no /boot/vmlinuz-* with its /lib/modules (is linux-image-amd64 installed?)")?;
    Ok(Kernel {
        image: PathBuf::from(format!("/boot/vmlinuz-{version}")),
        version,
        module_root: PathBuf::from("/"),
    })
}

/// The installed kernel, or the newer one (`--newer-kernel`).
pub fn kernel(newer: bool) -> Result<Kernel> {
    if newer {
        newer_kernel()
    } else {
        installed_kernel()
    }
}

/// Where the newer kernel comes from: Debian's next release's backports, whose
/// linux-image-amd64 follows upstream's recent stable kernels.
const NEWER_KERNEL_SUITE: &str = "trixie-backports";

/// A newer Debian kernel than the host's release has (for what 6.1 lacks, such as kernel TLS
/// taking a new key): the packages of `NEWER_KERNEL_SUITE`'s linux-image-amd64, fetched by apt
/// with a private package list and unpacked under target/vm, never installed on the host.
pub fn newer_kernel() -> Result<Kernel> {
    let dir = workspace_root().join(format!("target/vm/{NEWER_KERNEL_SUITE}"));
    for sub in ["lists/partial", "cache/archives/partial"] {
        std::fs::create_dir_all(dir.join(sub))?;
    }
    let sources = dir.join("sources.list");
    std::fs::write(
        &sources,
        format!(
            "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] \
             http://deb.debian.org/debian {NEWER_KERNEL_SUITE} main\n"
        ),
    )?;
    let apt_options = [
        format!("Dir::Etc::SourceList={}", sources.display()),
        "Dir::Etc::SourceParts=/nonexistent".into(),
        format!("Dir::State::Lists={}", dir.join("lists").display()),
        format!("Dir::Cache={}", dir.join("cache").display()),
        "Debug::NoLocking=1".into(),
        "APT::Sandbox::User=root".into(),
    ];
    let apt = |tool: &str| {
        let mut command = Command::new(tool);
        for option in &apt_options {
            command.arg("-o").arg(option);
        }
        command.current_dir(&dir);
        command
    };
    run(apt("apt-get").args(["update", "-qq"]))?;
    let depends = |package: &str| -> Result<Vec<String>> {
        let out = apt("apt-cache").args(["depends", package]).output()?;
        if !out.status.success() {
            bail!("apt-cache depends {package} failed");
        }
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|line| line.trim().strip_prefix("Depends: "))
            .map(str::to_string)
            .collect())
    };
    let image_package = depends("linux-image-amd64")?
        .into_iter()
        .find(|name| name.starts_with("linux-image-"))
        .context("linux-image-amd64 names no versioned kernel package")?;
    let version = image_package["linux-image-".len()..].to_string();
    let root = dir.join(format!("root-{version}"));
    let done = root.join(".unpacked");
    if !done.exists() {
        // Newer packaging splits the kernel over linux-{binary,modules,base}-VERSION.
        let mut packages = vec![image_package.clone()];
        packages.extend(
            depends(&image_package)?
                .into_iter()
                .filter(|name| name.starts_with("linux-") && name.ends_with(&version)),
        );
        eprintln!("xtask: fetching {} for the VM", packages.join(" "));
        run(apt("apt-get").args(["download", "-qq"]).args(&packages))?;
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root)?;
        for package in &packages {
            let deb = std::fs::read_dir(&dir)?
                .filter_map(|entry| entry.ok())
                .map(|entry| entry.path())
                .find(|path| {
                    path.file_name()
                        .and_then(|name| name.to_str())
                        .is_some_and(|name| {
                            name.starts_with(&format!("{package}_")) && name.ends_with(".deb")
                        })
                })
                .with_context(|| format!("apt fetched no {package}"))?;
            run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))?;
            std::fs::remove_file(&deb)?;
        }
        // Merged /usr: modprobe and depmod look under ROOT/lib/modules.
        if !root.join("lib").exists() {
            std::os::unix::fs::symlink("usr/lib", root.join("lib"))?;
        }
        run(Command::new("depmod").arg("-b").arg(&root).arg(&version))?;
        std::fs::write(&done, "")?;
    }
    let image = [
        root.join(format!("lib/modules/{version}/vmlinuz")),
        root.join(format!("boot/vmlinuz-{version}")),
    ]
    .into_iter()
    .find(|path| path.exists())
    .with_context(|| format!("no kernel image in {}", root.display()))?;
    Ok(Kernel {
        version,
        image,
        module_root: root,
    })
}

/// `insmod` lines for `module` and what it needs, from modprobe's own dependency list.
fn module_files(kernel: &Kernel, module: &str) -> Result<Vec<PathBuf>> {
    let out = Command::new("modprobe")
        .arg("-d")
        .arg(&kernel.module_root)
        .args(["-S", &kernel.version, "--show-depends", module])
        .output()
        .context("modprobe")?;
    if !out.status.success() {
        bail!(
            "modprobe --show-depends {module}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| line.strip_prefix("insmod "))
        .map(|rest| PathBuf::from(rest.split_whitespace().next().unwrap_or_default()))
        .collect())
}

const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for module in $(cat /modules.order); do insmod "$module" 2>/dev/null; done
mkdir -p /host /rw /newroot
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144 hostroot /host || echo "9p mount failed"
mount -t tmpfs tmpfs /rw
mkdir -p /rw/upper /rw/work
mount -t overlay overlay -o lowerdir=/host,upperdir=/rw/upper,workdir=/rw/work /newroot
mount -t proc proc /newroot/proc
mount -t sysfs sys /newroot/sys
mount -t devtmpfs dev /newroot/dev
# /tmp stays the overlay's: the workspace may live under the host's /tmp.
mount -t bpf bpf /newroot/sys/fs/bpf 2>/dev/null
# Modules the kernel asks for (gcm(aes) for kernel TLS) come from the host's tree, or from
# where the kernel's packages were unpacked.
modroot=$(sed -n 's/.*wsplice\.modroot=\([^ ]*\).*/\1/p' /proc/cmdline)
printf '#!/bin/sh\nexec chroot /newroot /sbin/modprobe -d "%s" "$@"\n' "$modroot" > /modprobe-helper
chmod +x /modprobe-helper
echo /modprobe-helper > /proc/sys/kernel/modprobe
# What udev loads at boot for this CPU's features: without them the kernel's crypto is its
# generic C code (gcm_base(ctr(aes-generic),...)), which no real machine would run.
/modprobe-helper -a aesni_intel ghash_clmulni_intel chacha_x86_64 poly1305_x86_64 2>/dev/null
ip link set lo up
script=$(sed -n 's/.*wsplice\.script=\([^ ]*\).*/\1/p' /proc/cmdline)
echo "wsplice-vm: kernel $(uname -r), running $script"
chroot /newroot /bin/sh -c "ulimit -n 65536; exec /bin/sh $script"
echo "WSPLICE-VM-EXIT=$?"
poweroff -f
"#;

/// Builds (once per kernel version and init script) the initramfs; returns its path.
fn initramfs(kernel: &Kernel) -> Result<PathBuf> {
    let version = &kernel.version;
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    (INIT, MODULES).hash(&mut hasher);
    let dir = workspace_root().join("target/vm");
    let image = dir.join(format!(
        "initramfs-{version}-{:016x}.cpio.gz",
        hasher.finish()
    ));
    if image.exists() {
        return Ok(image);
    }
    let root = dir.join(format!("initramfs-{version}"));
    let _ = std::fs::remove_dir_all(&root);
    for sub in ["bin", "proc", "sys", "dev", "modules"] {
        std::fs::create_dir_all(root.join(sub))?;
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox"))?;
    let mut order = String::new();
    let mut seen = std::collections::HashSet::new();
    for module in MODULES {
        for file in module_files(kernel, module)? {
            if !seen.insert(file.clone()) {
                continue;
            }
            // Compressed modules are unpacked: busybox's insmod takes plain ELF.
            let text = file.to_string_lossy().into_owned();
            let unpacker = [(".xz", "xz"), (".zst", "zstd")]
                .into_iter()
                .find_map(|(suffix, tool)| Some((text.strip_suffix(suffix)?, tool)));
            let plain_name = match unpacker {
                Some((stem, tool)) => {
                    let out = Command::new(tool).arg("-dc").arg(&file).output()?;
                    let plain = root
                        .join("modules")
                        .join(Path::new(stem).file_name().context("module name")?);
                    std::fs::write(&plain, out.stdout)?;
                    plain
                }
                None => {
                    let target = root
                        .join("modules")
                        .join(file.file_name().context("module path")?);
                    std::fs::copy(&file, &target)?;
                    target
                }
            };
            let name = plain_name.file_name().context("module name")?;
            order.push_str(&format!("/modules/{}\n", name.to_string_lossy()));
        }
    }
    std::fs::write(root.join("modules.order"), order)?;
    let init = root.join("init");
    std::fs::write(&init, INIT)?;
    std::fs::set_permissions(&init, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let partial = image.with_extension("partial");
    run(Command::new("sh").arg("-c").arg(format!(
        "cd '{}' && find . | cpio -o -H newc --quiet | gzip -1 > '{}'",
        root.display(),
        partial.display()
    )))?;
    std::fs::rename(&partial, &image)?;
    Ok(image)
}

/// KVM only where the CPU shows hardware virtualisation: a paravirtual /dev/kvm hangs a
/// stock kernel.
fn accelerator() -> &'static str {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let hardware = cpuinfo
        .lines()
        .filter(|line| line.starts_with("flags"))
        .any(|line| line.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    if hardware && Path::new("/dev/kvm").exists() {
        "kvm"
    } else {
        "tcg"
    }
}

/// Boots the VM, runs `script` (a shell script on the host's file system) inside it, and
/// returns its exit code. The console is copied to stderr as it comes.
pub fn run_script(kernel: &Kernel, script: &Path, limit: Duration) -> Result<i32> {
    Ok(run_script_collecting(kernel, script, limit, None)?.0)
}

/// `run_script`, also returning the console lines that start with `prefix` (prefix removed):
/// the VM's files do not outlive it, so results come back this way.
pub fn run_script_collecting(
    kernel: &Kernel,
    script: &Path,
    limit: Duration,
    prefix: Option<&str>,
) -> Result<(i32, Vec<String>)> {
    let mut collected = Vec::new();
    let initrd = initramfs(kernel)?;
    let accel = accelerator();
    eprintln!(
        "xtask: VM: kernel {}, {accel}, running {}",
        kernel.version,
        script.display()
    );
    let mut qemu = Command::new("qemu-system-x86_64")
        .args(["-nographic", "-no-reboot", "-m", "3072", "-smp", "2"])
        .args(["-accel", accel])
        .args(["-cpu", if accel == "kvm" { "host" } else { "max" }])
        .arg("-kernel")
        .arg(&kernel.image)
        .arg("-initrd")
        .arg(&initrd)
        .arg("-append")
        .arg(format!(
            "console=ttyS0 panic=-1 quiet loglevel=3 wsplice.script={} wsplice.modroot={}",
            script.display(),
            kernel.module_root.display()
        ))
        .args([
            "-virtfs",
            "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
        ])
        .args(["-net", "none"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("cannot start qemu-system-x86_64")?;
    let stdout = qemu.stdout.take().context("qemu's console")?;
    let (lines, received) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut raw = Vec::new();
        loop {
            raw.clear();
            match reader.read_until(b'\n', &mut raw) {
                Ok(0) | Err(_) => return,
                Ok(_) => {
                    let line = String::from_utf8_lossy(&raw).trim_end().to_string();
                    if lines.send(line).is_err() {
                        return;
                    }
                }
            }
        }
    });
    let deadline = Instant::now() + limit;
    let mut code = None;
    while Instant::now() < deadline {
        match received.recv_timeout(Duration::from_millis(200)) {
            Ok(line) => {
                eprintln!("vm| {line}");
                if let Some(rest) = prefix.and_then(|prefix| line.strip_prefix(prefix)) {
                    collected.push(rest.to_string());
                }
                if let Some(rest) = line.trim().strip_prefix(MARKER) {
                    code = rest.trim().parse().ok();
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
        }
        if qemu.try_wait()?.is_some() && code.is_some() {
            break;
        }
    }
    let _ = qemu.kill();
    let _ = qemu.wait();
    let code = code.with_context(|| {
        format!("the VM gave no exit marker within {limit:?} (see the console lines above)")
    })?;
    Ok((code, collected))
}
