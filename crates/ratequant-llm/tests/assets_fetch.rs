//! The fetch-verify-install path with stand-in download clients (shell scripts that copy
//! prepared archives, fail, or are missing), so no network is needed: chunk order, sha256
//! checks of archives and of the assembled file, atomic install, no second download.
#![cfg(unix)]

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use ratequant_llm::assets::{
    digest_dir, sha256_file, Asset, AssetCache, AssetKind, Install, PypiPart, Source,
};
use ratequant_llm::LoadError;

fn leak<T>(x: T) -> &'static T {
    Box::leak(Box::new(x))
}

fn leak_str(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

/// A wheel (zip) holding `member` with `contents`.
fn write_wheel(path: &Path, member: &str, contents: &[u8]) {
    let file = std::fs::File::create(path).unwrap();
    let mut zip = zip::ZipWriter::new(file);
    let opts = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated);
    zip.start_file("pkg/__init__.py", opts).unwrap();
    zip.write_all(b"").unwrap();
    zip.start_file(member, opts).unwrap();
    zip.write_all(contents).unwrap();
    zip.finish().unwrap();
}

/// A stand-in for `python3 -m pip download ... NAME==VER -d DIR`: copies `$fixtures/NAME.whl`
/// into DIR and logs the call.
fn fake_pip(dir: &Path, fixtures: &Path, log: &Path) -> PathBuf {
    let script = dir.join("fake-python");
    let body = format!(
        "#!/bin/sh\nset -e\nspec=''\ndest=''\nwhile [ $# -gt 0 ]; do\n  case \"$1\" in\n    -d) dest=\"$2\"; shift;;\n    *==*) spec=\"$1\";;\n  esac\n  shift\ndone\nname=${{spec%%==*}}\necho \"$spec\" >> '{log}'\nif [ ! -f '{fx}'/\"$name\".whl ]; then echo \"ERROR: network is unreachable for $name\" >&2; exit 1; fi\ncp '{fx}'/\"$name\".whl \"$dest\"/\"$name\"-1.0-py3-none-any.whl\n",
        log = log.display(),
        fx = fixtures.display()
    );
    std::fs::write(&script, body).unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    script
}

struct Setup {
    _tmp: tempfile::TempDir,
    cache: AssetCache,
    log: PathBuf,
    chunks: Vec<Vec<u8>>,
    fixtures: PathBuf,
}

fn setup() -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let fixtures = tmp.path().join("fixtures");
    std::fs::create_dir_all(&fixtures).unwrap();
    let chunks: Vec<Vec<u8>> = (0..3u8)
        .map(|i| {
            (0..1000u32)
                .map(|j| (j as u8).wrapping_mul(i + 1))
                .collect()
        })
        .collect();
    for (i, c) in chunks.iter().enumerate() {
        write_wheel(
            &fixtures.join(format!("chunk{i}.whl")),
            &format!("pkg/data/part{i:02}.bin"),
            c,
        );
    }
    let log = tmp.path().join("calls.log");
    let python = fake_pip(tmp.path(), &fixtures, &log);
    let cache = AssetCache::new(tmp.path().join("cache"))
        .with_clients(python.to_str().unwrap(), "npm-not-used");
    Setup {
        _tmp: tmp,
        cache,
        log,
        chunks,
        fixtures,
    }
}

fn chunked_asset(
    s: &Setup,
    archive_sha: Option<Vec<String>>,
    file_sha: Option<String>,
) -> &'static Asset {
    let parts: Vec<PypiPart> = (0..3)
        .map(|i| PypiPart {
            package: leak_str(format!("chunk{i}")),
            version: "1.0",
            archive_sha256: leak_str(match &archive_sha {
                Some(v) => v[i].clone(),
                None => sha256_file(&s.fixtures.join(format!("chunk{i}.whl"))).unwrap(),
            }),
            member: leak_str(format!("pkg/data/part{i:02}.bin")),
        })
        .collect();
    let joined: Vec<u8> = s.chunks.concat();
    let sha = file_sha.unwrap_or_else(|| {
        let p = s._tmp.path().join("joined");
        std::fs::write(&p, &joined).unwrap();
        sha256_file(&p).unwrap()
    });
    leak(Asset {
        name: "test-model",
        kind: AssetKind::Model,
        description: "test",
        license: "test",
        source: Source::Pypi {
            parts: Box::leak(parts.into_boxed_slice()),
            sdist: false,
        },
        install: Install::File {
            name: "model.gguf",
            sha256: leak_str(sha),
            bytes: joined.len() as u64,
        },
    })
}

fn calls(s: &Setup) -> usize {
    std::fs::read_to_string(&s.log)
        .map(|t| t.lines().count())
        .unwrap_or(0)
}

/// Files in the asset's directory, to check nothing half-written is left.
fn leftovers(cache: &AssetCache, asset: &Asset) -> Vec<String> {
    let dir = cache.path_of(asset).parent().unwrap().to_path_buf();
    match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => vec![],
    }
}

#[test]
fn chunks_are_joined_in_order_verified_and_installed_once() {
    let s = setup();
    let asset = chunked_asset(&s, None, None);
    assert!(!s.cache.is_cached(asset));
    let path = s.cache.ensure(asset).unwrap();
    assert_eq!(path, s.cache.path_of(asset));
    assert_eq!(std::fs::read(&path).unwrap(), s.chunks.concat());
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o644
    );
    assert_eq!(calls(&s), 3);
    assert_eq!(
        std::fs::read_to_string(&s.log).unwrap(),
        "chunk0==1.0\nchunk1==1.0\nchunk2==1.0\n"
    );
    assert_eq!(leftovers(&s.cache, asset), vec!["model.gguf".to_string()]);
    // Second use: no download.
    assert_eq!(s.cache.ensure(asset).unwrap(), path);
    assert_eq!(calls(&s), 3);
}

#[test]
fn archive_checksum_mismatch_leaves_nothing() {
    let s = setup();
    let mut shas: Vec<String> = (0..3)
        .map(|i| sha256_file(&s.fixtures.join(format!("chunk{i}.whl"))).unwrap())
        .collect();
    shas[1] = "0".repeat(64);
    let asset = chunked_asset(&s, Some(shas), None);
    let err = s.cache.ensure(asset).unwrap_err();
    assert!(matches!(err, LoadError::Checksum { .. }), "{err:?}");
    assert!(err.to_string().contains("chunk1"), "{err}");
    assert!(!s.cache.is_cached(asset));
    assert!(
        leftovers(&s.cache, asset).is_empty(),
        "{:?}",
        leftovers(&s.cache, asset)
    );
}

#[test]
fn assembled_checksum_mismatch_leaves_nothing() {
    let s = setup();
    let asset = chunked_asset(&s, None, Some("f".repeat(64)));
    let err = s.cache.ensure(asset).unwrap_err();
    assert!(matches!(err, LoadError::Checksum { .. }), "{err:?}");
    assert!(err.to_string().contains("assembled"), "{err}");
    assert!(!s.cache.is_cached(asset));
    assert!(leftovers(&s.cache, asset).is_empty());
}

#[test]
fn client_failure_and_missing_client_are_clear() {
    let s = setup();
    // The registry "fails" for the last chunk.
    std::fs::remove_file(s.fixtures.join("chunk2.whl")).unwrap();
    let shas: Vec<String> = (0..2)
        .map(|i| sha256_file(&s.fixtures.join(format!("chunk{i}.whl"))).unwrap())
        .chain(std::iter::once("0".repeat(64)))
        .collect();
    let asset = chunked_asset(&s, Some(shas), Some("0".repeat(64)));
    let err = s.cache.ensure(asset).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, LoadError::Fetch { .. }), "{err:?}");
    assert!(
        msg.contains("network is unreachable for chunk2") && msg.contains("chunk2==1.0"),
        "{msg}"
    );
    assert!(leftovers(&s.cache, asset).is_empty());

    let missing = AssetCache::new(s.cache.root()).with_clients("/nonexistent/python3", "npm");
    let msg = missing.ensure(asset).unwrap_err().to_string();
    assert!(
        msg.contains("/nonexistent/python3") && msg.contains("not installed"),
        "{msg}"
    );
}

#[test]
fn digest_dir_depends_on_names_and_contents() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    std::fs::write(d.join("ca01"), "x").unwrap();
    std::fs::write(d.join("ca02"), "y").unwrap();
    let a = digest_dir(d).unwrap();
    std::fs::write(d.join("ca02"), "z").unwrap();
    let b = digest_dir(d).unwrap();
    std::fs::rename(d.join("ca02"), d.join("ca03")).unwrap();
    let c = digest_dir(d).unwrap();
    assert!(a != b && b != c && a != c);
}

#[test]
fn real_assets_are_pinned() {
    for asset in ratequant_llm::assets::ASSETS {
        match &asset.install {
            Install::File { sha256, .. } | Install::BrownDir { sha256, .. } => {
                assert_eq!(sha256.len(), 64, "{}", asset.name);
                assert!(
                    sha256.bytes().all(|b| b.is_ascii_hexdigit()),
                    "{}",
                    asset.name
                );
            }
        }
        match &asset.source {
            Source::Pypi { parts, .. } => {
                assert!(!parts.is_empty());
                for p in parts.iter() {
                    assert_eq!(p.archive_sha256.len(), 64, "{}", p.package);
                }
            }
            Source::Npm { archive_sha256, .. } => assert_eq!(archive_sha256.len(), 64),
        }
    }
    for name in ["smollm2", "qwen2.5-0.5b", "gemma3-270m", "botchan", "brown"] {
        assert!(ratequant_llm::assets::find_asset(name).is_some(), "{name}");
    }
}
