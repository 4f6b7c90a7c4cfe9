//! Real model, real text: SmolLM2-135M on Botchan (fetched into the asset cache on first use),
//! two chunks of 512 tokens under the llama.cpp protocol. Full precision must give a sane
//! perplexity, and a 2-bit KIVI cache must be measurably worse.

use std::sync::Arc;

use ratequant::quant::{self, QuantizerSpec};
use ratequant_llm::eval::{evaluate, EvalOptions, Protocol, QuantSetting};
use ratequant_llm::{load_model, load_text, AssetCache, Decoder, KvQuantPlan, SimSemantics};

#[test]
fn smollm2_botchan_fp_and_kivi2() {
    let cache = AssetCache::from_env();
    let model = load_model("smollm2", &cache).expect("smollm2 loads (fetched on first use)");
    let text = load_text("botchan", &cache).expect("botchan loads");
    let config = model.config.clone();
    let tokens = model.tokenizer.encode(&text, config.add_bos).unwrap();
    let decoder = Decoder::new(&config, &model.weights).unwrap();
    let options = EvalOptions {
        ctx: 512,
        max_chunks: Some(2),
        protocol: Protocol::Llama,
    };

    let kivi = Arc::from(quant::build(&QuantizerSpec::parse("kivi").unwrap()).unwrap());
    let plan = KvQuantPlan::uniform(kivi, 2, config.num_layers, config.num_kv_heads).unwrap();
    let report = evaluate(
        &decoder,
        &tokens,
        &options,
        Some(QuantSetting {
            plan: &plan,
            residual: 0,
            semantics: SimSemantics::Tile,
            packed: None,
        }),
        &mut |_, _| {},
    )
    .unwrap();
    let fp = report.fp_perplexity.unwrap();
    eprintln!(
        "smollm2/botchan, 2 chunks of 512 (llama.cpp protocol): fp {:.4} ± {:.4}, kivi:2 {:.4} ± {:.4}, {:?}",
        fp.perplexity, fp.stderr, report.perplexity.perplexity, report.perplexity.stderr, report.divergence
    );
    let q = report.perplexity;
    assert_eq!(report.chunks, 2);
    assert_eq!(fp.tokens, 2 * 255);
    // A 135M model on 19th-century English prose: well above 1, far below uniform (49152).
    assert!(
        fp.perplexity > 5.0 && fp.perplexity < 60.0,
        "fp perplexity {}",
        fp.perplexity
    );
    assert!(
        q.perplexity > fp.perplexity * 1.01,
        "kivi:2 {} is not worse than fp {}",
        q.perplexity,
        fp.perplexity
    );
    let div = report.divergence.unwrap();
    assert!(
        div.mean_kl > 1e-3 && div.top1_agreement < 1.0 && div.top1_agreement > 0.3,
        "{div:?}"
    );
}
