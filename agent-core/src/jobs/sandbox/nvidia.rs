//! The NVIDIA driver's user-space side, for jobs granted GPUs: the libraries CUDA, NVML, OpenCL,
//! Vulkan and video programs load, and the driver's own tools such as `nvidia-smi`.
//!
//! They must match the kernel driver exactly, so they come from the host, never from an image.
//! Every job granted a GPU, base image or not, gets them bound read-only under [`DIR`], with
//! `LD_LIBRARY_PATH` and `PATH` pointing there: one mechanism, whatever the image holds and
//! wherever the host's packaging put the driver. The list follows what libnvidia-container mounts
//! for the `compute`, `utility`, `video` and `graphics` capabilities.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};

/// Where the driver's files appear inside the sandbox.
pub const DIR: &str = "/.hearth/nvidia";

/// Library name prefixes of the NVIDIA driver (each followed by `.so`).
const LIBRARIES: &[&str] = &[
    "libcuda",
    "libcudadebugger",
    "libnvidia-ml",
    "libnvidia-cfg",
    "libnvidia-ptxjitcompiler",
    "libnvidia-nvvm",
    "libnvidia-gpucomp",
    "libnvidia-allocator",
    "libnvidia-opencl",
    "libnvidia-compiler",
    "libnvidia-pkcs11",
    "libnvidia-pkcs11-openssl3",
    "libnvcuvid",
    "libnvidia-encode",
    "libnvidia-opticalflow",
    "libnvidia-fbc",
    "libnvidia-eglcore",
    "libnvidia-glcore",
    "libnvidia-glsi",
    "libnvidia-glvkspirv",
    "libnvidia-tls",
    "libnvidia-rtcore",
    "libnvoptix",
    "libGLX_nvidia",
    "libEGL_nvidia",
    "libGLESv2_nvidia",
    "libGLESv1_CM_nvidia",
];

/// The driver's programs a job may run.
const PROGRAMS: &[&str] =
    &["nvidia-smi", "nvidia-debugdump", "nvidia-cuda-mps-control", "nvidia-cuda-mps-server"];

/// How `ldconfig -p` names this machine's own architecture.
const ARCH: &str = if cfg!(target_arch = "aarch64") { "AArch64" } else { "x86-64" };

/// The host files to bind, each under the name it gets inside [`DIR`]`/lib` or `/bin`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DriverFiles {
    /// Libraries: (file name inside, file on the host with every symlink resolved).
    pub libraries: Vec<(String, PathBuf)>,
    /// Programs, the same way.
    pub programs: Vec<(String, PathBuf)>,
}

impl DriverFiles {
    /// The driver files of this host, as the dynamic linker's cache lists them. Empty when the
    /// driver is not installed.
    pub fn find() -> Self {
        let listing = ["/sbin/ldconfig", "/usr/sbin/ldconfig", "ldconfig"]
            .iter()
            .find_map(|ldconfig| Command::new(ldconfig).arg("-p").output().ok())
            .map(|out| String::from_utf8_lossy(&out.stdout).into_owned())
            .unwrap_or_default();
        let libraries = resolved(parse_ldconfig(&listing));
        let programs = PROGRAMS
            .iter()
            .filter_map(|name| {
                ["/usr/bin", "/usr/local/bin", "/bin"]
                    .iter()
                    .map(|dir| Path::new(dir).join(name))
                    .find(|path| path.is_file())
                    .map(|path| (name.to_string(), path))
            })
            .collect();
        Self { libraries, programs: resolved(programs) }
    }

    /// The library folder inside the sandbox.
    pub fn library_dir() -> String {
        format!("{DIR}/lib")
    }

    /// The program folder inside the sandbox.
    pub fn program_dir() -> String {
        format!("{DIR}/bin")
    }
}

/// The driver's entries of an `ldconfig -p` listing for this architecture, each name once.
fn parse_ldconfig(listing: &str) -> Vec<(String, PathBuf)> {
    let mut found: Vec<(String, PathBuf)> = Vec::new();
    for line in listing.lines() {
        // "\tlibcuda.so.1 (libc6,x86-64) => /lib/x86_64-linux-gnu/libcuda.so.1"
        let Some((name_and_tags, path)) = line.trim().split_once(" => ") else { continue };
        let Some((name, tags)) = name_and_tags.split_once(' ') else { continue };
        let native = tags.trim_matches(['(', ')']).split(',').any(|tag| tag == ARCH);
        let driver = LIBRARIES.iter().any(|prefix| {
            name.strip_prefix(prefix).is_some_and(|rest| rest == ".so" || rest.starts_with(".so."))
        });
        if native && driver && !found.iter().any(|(seen, _)| seen == name) {
            found.push((name.to_owned(), PathBuf::from(path)));
        }
    }
    found
}

/// Resolves each path's symlinks, dropping entries whose file is gone.
fn resolved(files: Vec<(String, PathBuf)>) -> Vec<(String, PathBuf)> {
    files.into_iter().filter_map(|(name, path)| Some((name, path.canonicalize().ok()?))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_drivers_libraries_for_this_architecture_are_taken() {
        let listing = format!(
            "4 libs found in cache `/etc/ld.so.cache'\n\
             \tlibcuda.so.1 ({ARCH}) => /lib/x86_64-linux-gnu/libcuda.so.1\n\
             \tlibcuda.so.1 (libc6,{ARCH}) => /usr/lib/other/libcuda.so.1\n\
             \tlibcuda.so (libc6,{ARCH}) => /lib/x86_64-linux-gnu/libcuda.so\n\
             \tlibcudart.so.12 (libc6,{ARCH}) => /usr/local/cuda/lib64/libcudart.so.12\n\
             \tlibnvidia-ml.so.1 (libc6) => /lib/i386-linux-gnu/libnvidia-ml.so.1\n\
             \tlibnvidia-ml.so.1 (libc6,{ARCH}) => /lib/x86_64-linux-gnu/libnvidia-ml.so.1\n\
             \tlibnvidia-mlx.so.1 (libc6,{ARCH}) => /lib/x86_64-linux-gnu/libnvidia-mlx.so.1\n\
             \tlibz.so.1 (libc6,{ARCH}) => /lib/x86_64-linux-gnu/libz.so.1\n"
        );
        let names: Vec<String> = parse_ldconfig(&listing).into_iter().map(|(name, _)| name).collect();
        // The CUDA runtime belongs to the job's image, not to the driver; 32-bit builds and
        // look-alike names stay out; the first of two entries with one name wins, as in ld.so.
        assert_eq!(names, ["libcuda.so.1", "libcuda.so", "libnvidia-ml.so.1"]);
    }
}
