//! The WASI runner: wasmtime for `wasm32-wasip1` modules.
//!
//! The agent compiles a module once, outside the sandbox, into a cache keyed by the module's
//! SHA-256 and the engine's compatibility hash ([`compile_cached`]); a job then only loads the
//! compiled code, inside the sandbox's init ([`run_inside`]). The guest sees `/in` read-only and
//! `/out`, `/work` and `/tmp` read-write as preopened folders, its args and env, and its stdout and
//! stderr. Linear memory is capped through the store's resource limiter and running time through
//! epoch interruption; the sandbox around it holds either way.

use std::collections::BTreeMap;
use std::collections::hash_map::DefaultHasher;
use std::fs;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use hearth_api::local_file;
use wasmtime::{Config, Engine, Linker, Module, Store, StoreLimits, StoreLimitsBuilder, Trap};
use wasmtime_wasi::p1::{self, WasiP1Ctx};
use wasmtime_wasi::{FsPerms, I32Exit, WasiCtxBuilder};

/// One epoch tick. The deadline counts ticks, and a ticker thread frozen with its job does not
/// tick, so time spent paused is not charged to the job.
const TICK: Duration = Duration::from_millis(100);

/// The engine configuration shared by compiling and running; both sides must agree on it.
pub fn engine() -> anyhow::Result<Engine> {
    let mut config = Config::new();
    config.epoch_interruption(true);
    wasm(Engine::new(&config)).context("starting wasmtime")
}

/// The largest WebAssembly module a job may name.
pub const MAX_MODULE_BYTES: u64 = 256 << 20;

/// Compiles `module` for this engine unless the cache already holds it, and returns the compiled
/// file. Writes through a temporary file and a rename, so a crash never leaves a torn entry.
pub fn compile_cached(engine: &Engine, module: &Path, cache_dir: &Path) -> anyhow::Result<PathBuf> {
    let bytes = local_file::read_bytes(module, MAX_MODULE_BYTES, "module")?;
    let digest = ring::digest::digest(&ring::digest::SHA256, &bytes);
    let mut engine_hash = DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut engine_hash);
    let name = format!("{}-{:016x}.cwasm", hex::encode(digest.as_ref()), engine_hash.finish());
    let compiled = cache_dir.join(name);
    if compiled.is_file() {
        return Ok(compiled);
    }
    check_magic(module, &bytes)?;
    fs::create_dir_all(cache_dir).with_context(|| format!("creating {}", cache_dir.display()))?;
    let code = wasm(engine.precompile_module(&bytes))
        .with_context(|| format!("{} is not a valid WebAssembly module", module.display()))?;
    // A temporary file of its own per compile: concurrent compiles never share one.
    let mut temporary = tempfile::NamedTempFile::new_in(cache_dir)?;
    std::io::Write::write_all(&mut temporary, &code).context("writing the compiled module")?;
    temporary.persist(&compiled).with_context(|| format!("writing {}", compiled.display()))?;
    Ok(compiled)
}

/// The first bytes of every WebAssembly module (binary format, section 5.5.16).
const MAGIC: &[u8; 4] = b"\0asm";

/// Refuses a file that is not a WebAssembly module at all (a text file, a native binary) with one
/// line that shows how it starts, before wasmtime would answer with a dump of its bytes.
fn check_magic(module: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    if bytes.starts_with(MAGIC) {
        return Ok(());
    }
    if bytes.is_empty() {
        bail!("{} is not a valid WebAssembly module: it is empty", module.display());
    }
    let start = &bytes[..bytes.len().min(8)];
    bail!(
        "{} is not a valid WebAssembly module: it starts with \"{}\", not \"{}\"",
        module.display(),
        start.escape_ascii(),
        MAGIC.escape_ascii()
    )
}

/// wasmtime has its own error type; this brings it into `anyhow` so context can be added.
fn wasm<T>(result: wasmtime::Result<T>) -> anyhow::Result<T> {
    result.map_err(anyhow::Error::from)
}

struct State {
    wasi: WasiP1Ctx,
    limits: StoreLimits,
}

/// Runs a compiled module to its end inside the sandbox and returns its exit code. A trap, or the
/// time limit, is an error with the reason.
pub(crate) fn run_inside(
    compiled: &[u8],
    args: &[String],
    env: &BTreeMap<String, String>,
    memory_bytes: u64,
    time: Duration,
) -> anyhow::Result<i32> {
    let engine = engine()?;
    #[allow(unsafe_code)]
    // SAFETY: `compiled` was written by `compile_cached` with an engine of the same configuration
    // into the agent's own cache, which the job cannot write to; wasmtime checks the header and
    // the compatibility hash and refuses anything else.
    let module =
        wasm(unsafe { Module::deserialize(&engine, compiled) }).context("loading the compiled module")?;

    let mut wasi = WasiCtxBuilder::new();
    wasi.args(args).inherit_stdout().inherit_stderr();
    for (key, value) in env {
        wasi.env(key, value);
    }
    for (dir, perms) in [
        ("/in", FsPerms::ReadOnly),
        ("/out", FsPerms::ReadWrite),
        ("/work", FsPerms::ReadWrite),
        ("/tmp", FsPerms::ReadWrite),
    ] {
        wasm(wasi.preopened_dir(dir, dir, perms)).with_context(|| format!("opening {dir}"))?;
    }
    let limits =
        StoreLimitsBuilder::new().memory_size(usize::try_from(memory_bytes).unwrap_or(usize::MAX)).build();
    let mut store = Store::new(&engine, State { wasi: wasi.build_p1(), limits });
    store.limiter(|state| &mut state.limits);
    let ticks = time.as_millis().div_ceil(TICK.as_millis()).max(1);
    store.set_epoch_deadline(u64::try_from(ticks).unwrap_or(u64::MAX));
    let ticker = engine.clone();
    std::thread::spawn(move || {
        loop {
            std::thread::sleep(TICK);
            ticker.increment_epoch();
        }
    });

    let mut linker: Linker<State> = Linker::new(&engine);
    p1::add_to_linker_sync(&mut linker, |state| &mut state.wasi)?;
    let instance = wasm(linker.instantiate(&mut store, &module)).context("instantiating the module")?;
    let start = wasm(instance.get_typed_func::<(), ()>(&mut store, "_start"))
        .context("the module has no `_start` function (is it a wasm32-wasip1 command?)")?;
    match start.call(&mut store, ()) {
        Ok(()) => Ok(0),
        Err(error) => {
            if let Some(exit) = error.downcast_ref::<I32Exit>() {
                return Ok(exit.0);
            }
            if error.downcast_ref::<Trap>() == Some(&Trap::Interrupt) {
                bail!("time limit of {} exceeded", humantime::format_duration(time));
            }
            bail!("the module trapped: {error:#}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_that_is_not_wasm_is_one_line_that_shows_its_start() {
        let cases: [(&[u8], &str); 3] = [
            (
                b"this is not WebAssembly",
                r#"x.wasm is not a valid WebAssembly module: it starts with "this is ", not "\x00asm""#,
            ),
            (
                b"\x7fELF\x02\x01\x01\x00\x00\x00",
                r#"x.wasm is not a valid WebAssembly module: it starts with "\x7fELF\x02\x01\x01\x00", not "\x00asm""#,
            ),
            (b"", "x.wasm is not a valid WebAssembly module: it is empty"),
        ];
        for (bytes, line) in cases {
            let error = check_magic(Path::new("x.wasm"), bytes).unwrap_err();
            assert_eq!(format!("{error:#}"), line);
        }
        check_magic(Path::new("x.wasm"), b"\0asm\x01\0\0\0").unwrap();
    }

    #[test]
    fn compiling_random_bytes_fails_with_one_line() {
        let dir = tempfile::tempdir().unwrap();
        let module = dir.path().join("random.wasm");
        fs::write(&module, [0x13, 0x37, 0xfe, 0xed, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9]).unwrap();
        let error = compile_cached(&engine().unwrap(), &module, &dir.path().join("cache")).unwrap_err();
        let line = format!("{error:#}");
        assert!(!line.contains('\n'), "{line}");
        assert!(line.ends_with(r#"it starts with "\x137\xfe\xed\x00\x01\x02\x03", not "\x00asm""#), "{line}");
        assert!(!dir.path().join("cache").exists(), "nothing is cached for it");
    }
}
