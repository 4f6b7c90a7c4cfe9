//! `ratequant generate` end to end on a tiny Hugging Face model the test writes (byte-level
//! tokenizer, random weights): greedy and seeded runs repeat, `--json` holds the report, and
//! bad requests (context beyond the model's, a cache that cannot fit in memory, a plan for
//! another model) fail before generating, with clear messages and no report file.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use ratequant::bits::BitList;
use ratequant::formats::{
    BetaMode, Calib, CalibUnit, DistortionTarget, ImportanceSource, QuantizerInfo, CALIB_FORMAT,
    FORMAT_VERSION,
};
use ratequant::plan::{make_plan, PlanOptions, Policy};
use ratequant::quant::Kind;
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::{json, Value};

const HIDDEN: usize = 32;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = HIDDEN / HEADS;
const FFN: usize = 48;
const LAYERS: usize = 2;
const MAX_POSITION: usize = 64;

type Arg<'a> = &'a dyn AsRef<std::ffi::OsStr>;

fn run(args: &[Arg]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ratequant"));
    for a in args {
        cmd.arg(a);
    }
    cmd.output().expect("run ratequant")
}

fn stdout(o: &Output) -> String {
    String::from_utf8(o.stdout.clone()).expect("stdout is UTF-8")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// GPT-2's byte-to-character table.
fn byte_chars() -> Vec<char> {
    ratequant_llm::byte_level_chars().to_vec()
}

/// A byte-level BPE tokenizer: `<s>` (0) and `<|im_end|>` (1) special, bytes at 2..258.
fn tokenizer_json() -> Value {
    let mut vocab = serde_json::Map::new();
    vocab.insert("<s>".into(), json!(0));
    vocab.insert("<|im_end|>".into(), json!(1));
    for (i, c) in byte_chars().into_iter().enumerate() {
        vocab.insert(c.to_string(), json!(i + 2));
    }
    let special = |id: u32, content: &str| {
        json!({"id": id, "content": content, "single_word": false, "lstrip": false,
               "rstrip": false, "normalized": false, "special": true})
    };
    json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [special(0, "<s>"), special(1, "<|im_end|>")],
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": []}
    })
}

/// Deterministic values in [-a, a).
fn values(seed: u64, n: usize, a: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * a
        })
        .collect()
}

/// A tiny llama checkpoint (tied embeddings) in `dir` with the given maximum context.
fn write_model(dir: &Path, max_position: u64) {
    let vocab = 258;
    let (q, kv) = (HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM);
    let mut shapes = vec![
        ("model.embed_tokens.weight".to_string(), vec![vocab, HIDDEN]),
        ("model.norm.weight".to_string(), vec![HIDDEN]),
    ];
    for l in 0..LAYERS {
        let p = |n: &str| format!("model.layers.{l}.{n}");
        shapes.push((p("input_layernorm.weight"), vec![HIDDEN]));
        shapes.push((p("self_attn.q_proj.weight"), vec![q, HIDDEN]));
        shapes.push((p("self_attn.k_proj.weight"), vec![kv, HIDDEN]));
        shapes.push((p("self_attn.v_proj.weight"), vec![kv, HIDDEN]));
        shapes.push((p("self_attn.o_proj.weight"), vec![HIDDEN, q]));
        shapes.push((p("post_attention_layernorm.weight"), vec![HIDDEN]));
        shapes.push((p("mlp.gate_proj.weight"), vec![FFN, HIDDEN]));
        shapes.push((p("mlp.up_proj.weight"), vec![FFN, HIDDEN]));
        shapes.push((p("mlp.down_proj.weight"), vec![HIDDEN, FFN]));
    }
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = shapes
        .into_iter()
        .enumerate()
        .map(|(i, (name, shape))| {
            let n = shape.iter().product();
            let v: Vec<f32> = if name.ends_with("norm.weight") {
                values(i as u64, n, 0.1).iter().map(|x| 1.0 + x).collect()
            } else {
                values(i as u64, n, (3.0 / shape[shape.len() - 1] as f32).sqrt())
            };
            (
                name,
                shape,
                v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            )
        })
        .collect();
    let views: Vec<(String, TensorView)> = bytes
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                TensorView::new(Dtype::F32, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
    let config = json!({
        "model_type": "llama", "hidden_size": HIDDEN, "intermediate_size": FFN,
        "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": max_position,
        "vocab_size": vocab, "tie_word_embeddings": true, "bos_token_id": 0, "eos_token_id": 1,
        "hidden_act": "silu"
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    std::fs::write(dir.join("tokenizer.json"), tokenizer_json().to_string()).unwrap();
}

/// A PLAN.json for a model of `layers × heads` units of head_dim 8, with mixed bits.
fn write_plan(path: &Path, layers: usize, heads: usize) {
    let alphas: Vec<f64> = (0..layers * heads * 2)
        .map(|i| [1.0, 16.0, 0.25, 4.0][i % 4])
        .collect();
    let units = alphas
        .iter()
        .enumerate()
        .map(|(i, &alpha)| CalibUnit {
            layer: i / (2 * heads),
            head: (i / 2) % heads,
            kind: if i % 2 == 0 { Kind::K } else { Kind::V },
            tokens: 16,
            head_dim: HEAD_DIM,
            elements: 16 * HEAD_DIM as u64,
            importance: 1.0,
            variance: 1.0,
            mean_square: 1.0,
            metadata_bits: 1.0,
            distortion: (1..=8).map(|b| alpha * 4f64.powi(-b)).collect(),
            weighted_distortion: None,
            alpha,
            beta: None,
            r2: Some(1.0),
            fit_points: vec![1, 2, 3, 4],
        })
        .collect();
    let calib = Calib {
        format: CALIB_FORMAT.into(),
        version: FORMAT_VERSION,
        quantizer: QuantizerInfo {
            name: "kivi".into(),
            params: json!({ "group": 8 }),
        },
        measured_bits: BitList::range(1, 8).unwrap(),
        fit_bits: BitList::range(1, 4).unwrap(),
        target: DistortionTarget::Mse,
        importance: ImportanceSource::None,
        beta_mode: BetaMode::Shared,
        beta: 4.0,
        r2: Some(1.0),
        zero_floor: 1e-12,
        sequences: 1,
        units,
    };
    let plan = make_plan(
        &calib,
        &PlanOptions {
            avg_bits: 3.0,
            allowed: BitList::range(1, 8).unwrap(),
            policy: Policy::Ratequant,
            distortion_from: None,
        },
    )
    .unwrap();
    plan.save(path).unwrap();
}

struct Fixture {
    dir: tempfile::TempDir,
    model: PathBuf,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny");
    std::fs::create_dir(&model).unwrap();
    write_model(&model, MAX_POSITION as u64);
    Fixture { dir, model }
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn greedy_runs_repeat_and_the_report_has_every_field() {
    let f = fixture();
    let json_path = f.dir.path().join("report.json");
    let go = |json: &Path| {
        run(&[
            &"generate",
            &"--model",
            &f.model,
            &"--kv",
            &"kivi:g=8:2",
            &"--residual",
            &"4",
            &"--prompt",
            &"hello, world",
            &"--max-tokens",
            &"20",
            &"--prefill-chunk",
            &"5",
            &"--json",
            &json,
        ])
    };
    let first = go(&json_path);
    assert!(first.status.success(), "{}", stderr(&first));
    let second = go(&f.dir.path().join("again.json"));
    assert!(second.status.success(), "{}", stderr(&second));
    assert_eq!(stdout(&first), stdout(&second), "greedy runs differ");

    let r = read_json(&json_path);
    let prompt_tokens = "hello, world".len(); // one byte token each, no BOS
    assert_eq!(r["prompt_tokens"], prompt_tokens);
    let generated = r["generated_tokens"].as_u64().unwrap() as usize;
    match r["stop_reason"].as_str().unwrap() {
        "max_tokens" => assert_eq!(generated, 20),
        "end_of_text" => assert!(generated < 20),
        other => panic!("stop_reason {other}"),
    }
    assert_eq!(r["kv"], "kivi:g=8:2");
    assert_eq!(r["design"], "kivi:g=8");
    assert_eq!(r["residual"], 4);
    assert_eq!(r["mean_bits"], 2.0);
    assert_eq!(r["sampling"]["greedy"], true);
    assert_eq!(r["prefill_chunk"], 5);
    // The streamed text is the report's text, plus the final newline.
    assert_eq!(stdout(&first), format!("{}\n", r["text"].as_str().unwrap()));
    assert!(r["prefill_seconds"].as_f64().unwrap() > 0.0);
    assert!(r["prompt_tokens_per_second"].as_f64().unwrap() > 0.0);
    // The last generated token is never fed back, unless an end-of-text token ended the run.
    let held_tokens = match r["stop_reason"].as_str().unwrap() {
        "max_tokens" => prompt_tokens + generated - 1,
        _ => prompt_tokens + generated,
    };
    let kv = &r["kv_cache"];
    assert_eq!(kv["tokens"], held_tokens);
    // f16: tokens × layers × KV heads × head_dim × (K, V) × 2 bytes.
    assert_eq!(
        kv["f16_bytes"],
        held_tokens * LAYERS * KV_HEADS * HEAD_DIM * 2 * 2
    );
    let b = &kv["breakdown"];
    let parts: u64 = [
        "code_bytes",
        "metadata_bytes",
        "residual_bytes",
        "padding_bytes",
    ]
    .iter()
    .map(|k| b[k].as_u64().unwrap())
    .sum();
    assert_eq!(kv["bytes"].as_u64().unwrap(), parts);
    assert!(b["code_bytes"].as_u64().unwrap() > 0, "{kv}");
    let ratio = kv["f16_bytes"].as_f64().unwrap() / kv["bytes"].as_f64().unwrap();
    assert!((kv["times_smaller_than_f16"].as_f64().unwrap() - ratio).abs() < 1e-9);
    assert_eq!(r["kv_cache_planned"]["tokens"], prompt_tokens + 20);
    assert!(r["peak_resident_bytes"].as_u64().unwrap() > 1 << 20);
    let err = stderr(&first);
    assert!(err.contains("tokens/s") && err.contains("f16"), "{err}");
}

#[test]
fn seeded_sampling_repeats_and_seeds_differ() {
    let f = fixture();
    let sample = |seed: &str, kv: &str| {
        let o = run(&[
            &"generate",
            &"--model",
            &f.model,
            &"--kv",
            &kv,
            &"--prompt",
            &"abc",
            &"--max-tokens",
            &"24",
            &"--temperature",
            &"5",
            &"--top-p",
            &"0.9",
            &"--seed",
            &seed,
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        stdout(&o)
    };
    for kv in ["quarot:3", "fp"] {
        let a = sample("7", kv);
        assert_eq!(a, sample("7", kv), "{kv}: same seed, different text");
        assert_ne!(a, sample("8", kv), "{kv}: different seeds, same text");
    }
}

#[test]
fn a_mixed_plan_runs_and_a_plan_for_another_model_is_refused() {
    let f = fixture();
    let good = f.dir.path().join("plan.json");
    write_plan(&good, LAYERS, KV_HEADS);
    let json_path = f.dir.path().join("plan-report.json");
    let o = run(&[
        &"generate",
        &"--model",
        &f.model,
        &"--plan",
        &good,
        &"--prompt",
        &"plan",
        &"--max-tokens",
        &"8",
        &"--json",
        &json_path,
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let r = read_json(&json_path);
    assert_eq!(r["kv"], "plan");
    assert_eq!(r["design"], "kivi:g=8");
    assert_eq!(r["mean_bits"], 3.0);

    let other = f.dir.path().join("other.json");
    write_plan(&other, LAYERS + 1, KV_HEADS);
    let json_path = f.dir.path().join("refused.json");
    let o = run(&[
        &"generate",
        &"--model",
        &f.model,
        &"--plan",
        &other,
        &"--prompt",
        &"plan",
        &"--max-tokens",
        &"8",
        &"--json",
        &json_path,
    ]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains("another model") && err.contains("other.json") && err.contains("layer 2"),
        "{err}"
    );
    assert!(stdout(&o).is_empty(), "nothing generated: {}", stdout(&o));
    assert!(!json_path.exists(), "no report on error");
}

#[test]
fn a_context_beyond_the_model_is_refused() {
    let f = fixture();
    let json_path = f.dir.path().join("long.json");
    let o = run(&[
        &"generate",
        &"--model",
        &f.model,
        &"--kv",
        &"kivi:2",
        &"--prompt",
        &"0123456789",
        &"--max-tokens",
        &"60",
        &"--json",
        &json_path,
    ]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains("10 tokens + --max-tokens 60 = 70") && err.contains("maximum context of 64"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    assert!(!json_path.exists());
    assert!(stdout(&o).is_empty());
}

#[test]
fn a_cache_larger_than_available_memory_is_refused_before_allocating() {
    let dir = tempfile::tempdir().unwrap();
    // A model claiming a 2^40-token context: 2^38 tokens of f16 KV are 2^38 × 128 B = 32 TiB,
    // so both caches are refused on any machine before anything is allocated.
    write_model(dir.path(), 1 << 40);
    let json_path = dir.path().join("huge.json");
    for kv in ["fp", "kivi:2"] {
        let o = run(&[
            &"generate",
            &"--model",
            &dir.path(),
            &"--kv",
            &kv,
            &"--prompt",
            &"x",
            &"--max-tokens",
            &(1u64 << 38).to_string(),
            &"--json",
            &json_path,
        ]);
        assert!(!o.status.success());
        let err = stderr(&o);
        assert!(
            err.contains("needs") && err.contains("GiB") && err.contains("available"),
            "{kv}: {err}"
        );
        assert!(!err.contains("panicked"), "{kv}: {err}");
        assert!(!json_path.exists());
    }
}

#[test]
fn bad_arguments_are_named() {
    let f = fixture();
    let cases: [(&[&str], &str); 6] = [
        (&["--kv", "kivi:9"], "bits"),
        (
            &["--attention", "int8"],
            "--kv fp keeps the cache in full precision",
        ),
        (&["--temperature=-1"], "temperature"),
        (&["--temperature", "1", "--top-p", "0"], "top-p"),
        (&["--max-tokens", "0"], "--max-tokens"),
        (
            &["--kv", "quarot:2", "--prefill-chunk", "0"],
            "--prefill-chunk",
        ),
    ];
    for (extra, want) in cases {
        let mut args: Vec<Arg> = vec![&"generate", &"--model", &f.model, &"--prompt", &"hi"];
        args.extend(extra.iter().map(|e| e as Arg));
        let o = run(&args);
        assert!(!o.status.success(), "{extra:?}");
        let err = stderr(&o);
        assert!(err.contains(want), "{extra:?}: {err}");
        assert!(!err.contains("panicked"), "{extra:?}: {err}");
    }
    // No prompt at all.
    let o = run(&[&"generate", &"--model", &f.model]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--prompt"), "{}", stderr(&o));
}

/// `eval --kv-semantics packed` simulates what `generate`'s cache stores: for KIVI keys it
/// differs from the default tile simulation, and the report says which one ran.
#[test]
fn eval_simulates_the_packed_cache_on_request() {
    let f = fixture();
    let text = f.dir.path().join("text.txt");
    std::fs::write(
        &text,
        "the quick brown fox jumps over the lazy dog; ".repeat(4),
    )
    .unwrap();
    let eval = |semantics: &str| {
        let json_path = f.dir.path().join(format!("eval-{semantics}.json"));
        let o = run(&[
            &"eval",
            &"--model",
            &f.model,
            &"--data",
            &text,
            &"--ctx",
            &"40",
            &"--kv",
            &"kivi:g=8:2",
            &"--kv-semantics",
            &semantics,
            &"--json",
            &json_path,
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        read_json(&json_path)
    };
    let tile = eval("tile");
    let packed = eval("packed");
    assert_eq!(tile["kv_semantics"], "tile");
    assert_eq!(packed["kv_semantics"], "packed");
    let ppl = |r: &Value| r["perplexity"]["perplexity"].as_f64().unwrap();
    assert!(ppl(&tile).is_finite() && ppl(&packed).is_finite());
    assert_ne!(
        ppl(&tile),
        ppl(&packed),
        "the two simulations agree for KIVI keys"
    );
    let o = run(&[&"eval", &"--model", &f.model, &"--kv-semantics", &"exact"]);
    assert!(stderr(&o).contains("tile, packed"), "{}", stderr(&o));
}

#[test]
fn eval_runs_a_plan_and_refuses_one_for_another_model() {
    let f = fixture();
    let text = f.dir.path().join("text.txt");
    std::fs::write(&text, "a plan simulated over a tiny model; ".repeat(4)).unwrap();
    let eval = |plan: &Path, json_path: &Path| {
        run(&[
            &"eval", &"--model", &f.model, &"--data", &text, &"--ctx", &"40", &"--plan", &plan,
            &"--json", &json_path,
        ])
    };
    let good = f.dir.path().join("plan.json");
    write_plan(&good, LAYERS, KV_HEADS);
    let json_path = f.dir.path().join("eval-plan.json");
    let o = eval(&good, &json_path);
    assert!(o.status.success(), "{}", stderr(&o));
    let r = read_json(&json_path);
    assert_eq!(r["mean_bits"], 3.0);
    assert!(r["perplexity"]["perplexity"].as_f64().unwrap().is_finite());

    let other = f.dir.path().join("other.json");
    write_plan(&other, LAYERS + 1, KV_HEADS);
    let json_path = f.dir.path().join("eval-refused.json");
    let o = eval(&other, &json_path);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains("another model") && err.contains("layer 2"),
        "{err}"
    );
    assert!(!json_path.exists(), "no report on error");
}
