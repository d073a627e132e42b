//! The model as files and identities: its weights under Hugging Face names (what a
//! checkpoint stores), quantization of its projections, and its fingerprint.

use candle_core::{DType, Tensor};

use super::Model;
use crate::layers::{Linear, Quantization};
use crate::lora;
use crate::Result;

impl Model {
    /// Every weight under its Hugging Face name (after merging, what a checkpoint stores).
    pub fn named_weights(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = vec![(
            "model.embed_tokens.weight".to_string(),
            self.embed.embeddings().clone(),
        )];
        if !self.cfg.tie_word_embeddings {
            out.push(("lm_head.weight".into(), self.lm_head.weight()?));
        }
        out.push(("model.norm.weight".into(), self.norm.weight().clone()));
        for (i, layer) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            out.push((
                format!("{p}.input_layernorm.weight"),
                layer.input_norm.weight().clone(),
            ));
            out.push((
                format!("{p}.post_attention_layernorm.weight"),
                layer.post_norm.weight().clone(),
            ));
            for (t, block) in lora::TARGETS {
                let lin = layer.projection(t).expect("known target");
                out.push((format!("{p}.{block}.{t}.weight"), lin.weight()?));
                if let Some(b) = lin.bias() {
                    out.push((format!("{p}.{block}.{t}.bias"), b.clone()));
                }
            }
        }
        Ok(out)
    }

    /// Whether any projection holds GGML blocks (loaded so or quantized since): such a
    /// model takes LoRA adapters only unmerged, and has no backward pass.
    pub fn is_quantized(&self) -> bool {
        self.lm_head.quantization().is_some()
            || self.layers.iter().any(|l| {
                lora::TARGETS
                    .iter()
                    .any(|(t, _)| l.projection(t).is_some_and(|p| p.quantization().is_some()))
            })
    }

    /// Block-quantizes every projection and the LM head (embeddings stay dense: a lookup
    /// reads one row per token). Adapters must be merged first. Returns how many
    /// projections got each format (some fall back to Q8_0 or stay dense when their input
    /// size does not fit the blocks).
    pub fn quantize(&mut self, q: Quantization) -> Result<Vec<(String, usize)>> {
        let mut counts: std::collections::BTreeMap<String, usize> = Default::default();
        let mut note = |lin: &Linear| {
            let name = lin
                .quantization()
                .map_or("dense".to_string(), |f| format!("{f:?}").to_lowercase());
            *counts.entry(name).or_default() += 1;
        };
        for layer in &mut self.layers {
            for (t, _) in lora::TARGETS {
                let lin = layer.projection_mut(t).expect("known target");
                lin.quantize(q)?;
                note(lin);
            }
        }
        self.lm_head.quantize(q)?;
        note(&self.lm_head);
        Ok(counts.into_iter().collect())
    }

    /// A short identity of this model's function: a hash over the config and, for every
    /// weight (adapters merged or not), its name, shape, dtype and a strided sample of its
    /// values. Cached states carry it so a snapshot is never resumed on another model.
    pub fn fingerprint(&self) -> Result<String> {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        h.update(canonical_json(&self.cfg.raw).as_bytes());
        let mut weights = self.named_weights()?;
        weights.extend(self.lora_tensors());
        // Quantized weights are sampled dequantized; name the formats too.
        for layer in &self.layers {
            for (t, _) in lora::TARGETS {
                if let Some(f) = layer.projection(t).and_then(|l| l.quantization()) {
                    h.update(format!("{t}:{f:?}").as_bytes());
                }
            }
        }
        if let Some(f) = self.lm_head.quantization() {
            h.update(format!("lm_head:{f:?}").as_bytes());
        }
        for (name, t) in weights {
            h.update(name.as_bytes());
            h.update(format!("{:?}{:?}", t.dims(), t.dtype()).as_bytes());
            let flat = t.flatten_all()?;
            let n = flat.elem_count();
            let stride = (n / 256).max(1);
            let idx: Vec<u32> = (0..n).step_by(stride).map(|i| i as u32).collect();
            let sample = flat
                .index_select(&Tensor::new(idx.as_slice(), flat.device())?, 0)?
                .to_dtype(DType::F32)?
                .to_vec1::<f32>()?;
            for x in sample {
                h.update(x.to_le_bytes());
            }
        }
        Ok(h.finalize()[..16]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect())
    }
}

/// JSON text with every object's keys sorted, whatever order the value keeps them in:
/// serde_json keeps insertion order when any crate in the build enables its
/// `preserve_order` feature (llguidance does), and a fingerprint must not depend on that.
fn canonical_json(v: &serde_json::Value) -> String {
    use serde_json::Value;
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            let fields: Vec<String> = keys
                .into_iter()
                .map(|k| format!("{}:{}", Value::from(k.as_str()), canonical_json(&m[k])))
                .collect();
            format!("{{{}}}", fields.join(","))
        }
        Value::Array(a) => {
            let items: Vec<String> = a.iter().map(canonical_json).collect();
            format!("[{}]", items.join(","))
        }
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::canonical_json;

    #[test]
    fn canonical_json_sorts_keys_at_every_depth() {
        let v: serde_json::Value =
            serde_json::from_str(r#"{"b": {"d": 1, "c": [{"f": 0.5, "e": null}]}, "a": "x\""}"#)
                .unwrap();
        assert_eq!(
            canonical_json(&v),
            r#"{"a":"x\"","b":{"c":[{"e":null,"f":0.5}],"d":1}}"#
        );
    }
}
