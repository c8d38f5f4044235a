//! The Gemma 4 MTP assistant drafter (issue 15) against mlx-vlm: one draft step's next hidden state and
//! logits, and its greedy token, on random-weight drafters (a centroid-routed sparse head and a tied one)
//! over the K/V layouts a target's cache takes: a sliding window not yet full, exactly full, past it, and
//! one short of it after a rejected round (scripts/fixtures/gen_mtp.py).

mod common;

use jemma_engine::cache::Kv;
use jemma_engine::models::gemma4::Gemma4Assistant;
use jemma_engine::models::gemma4::assistant::SharedKv;
use mlx_rs::Array;

#[test]
fn a_draft_step_matches_mlx_vlm_on_every_kv_layout() {
    for name in ["mtp", "mtp-tied"] {
        let dir = common::fixture(name);
        let m = Gemma4Assistant::load(&dir, None).unwrap();
        let r = Array::load_safetensors(dir.join("reference.safetensors")).unwrap();
        for case in 0..4 {
            let get = |k: &str| r[&format!("case{case}.{k}")].clone();
            let valid = get("valid").as_slice::<i32>()[0];
            let position = get("position").as_slice::<i32>()[0];
            let ks = get("k_sliding");
            let kv = [
                Some(SharedKv {
                    first: valid - ks.shape()[2],
                    kv: Kv::Plain(ks, get("v_sliding")),
                }),
                Some(SharedKv {
                    first: 0,
                    kv: Kv::Plain(get("k_full"), get("v_full")),
                }),
            ];
            let (next, hn) = m
                .step(&get("embedding"), &get("hidden"), &kv, position)
                .unwrap();
            let logits = m.logits(&hn).unwrap();
            let what = format!("{name} case {case} (valid {valid})");
            let d = common::max_abs_diff(&next, &get("next_hidden"));
            assert!(d <= 1e-4, "{what}: next hidden off by {d}");
            let d = common::max_abs_diff(&logits, &get("logits"));
            assert!(d <= 1e-4, "{what}: logits off by {d}");
            assert_eq!(
                common::tokens(&m.argmax(&hn).unwrap().reshape(&[-1]).unwrap()),
                common::tokens(&get("argmax")),
                "{what}: greedy token"
            );
        }
    }
}
