//! Liger conversion settings as the user gives them (flags), checked and turned into the
//! `liger` section of the converted `config.json`.
//!
//! Flag values are validated in two steps: everything that does not depend on the model
//! ([`LigerSettings::validate`]) before any file is read or downloaded, so a typo fails
//! instantly; layer indices ([`LigerSettings::to_liger_config`]) once the layer count is known.

use std::str::FromStr;

use liger_model::config::{slots_fit, KvDtype, DEFAULT_SLOTS};
use liger_model::{LigerConfig, Variant};

use crate::{Error, Result};

/// The variant as config files and flags spell it (`gla`, `hgrn2`, `gsa`).
pub fn variant_name(v: Variant) -> &'static str {
    match v {
        Variant::Gla => "gla",
        Variant::Hgrn2 => "hgrn2",
        Variant::Gsa => "gsa",
    }
}

/// The variant for people: its name, plus the slot count for GSA (`gsa (64 slots)`).
pub fn variant_label(l: &LigerConfig) -> String {
    match l.gsa_slots() {
        Some(m) => format!("gsa ({m} slots)"),
        None => variant_name(l.variant).to_owned(),
    }
}

/// Which layers keep full softmax attention (Liger's inter-layer hybrid).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum FullAttention {
    /// Every layer becomes a Liger layer (the reference Liger-GLA).
    #[default]
    None,
    /// Exactly these layer indices.
    List(Vec<usize>),
    /// One full-attention layer after every `n - 1` Liger layers: layers n-1, 2n-1, ...
    Every(usize),
}

impl FromStr for FullAttention {
    type Err = Error;

    /// Parses `0,7,15`, `every:N`, `none` or the empty string.
    fn from_str(s: &str) -> Result<Self> {
        let flag = "--full-attention-layers";
        let s = s.trim();
        if s.is_empty() || s.eq_ignore_ascii_case("none") {
            return Ok(Self::None);
        }
        if let Some(n) = s.strip_prefix("every:") {
            let n: usize = n.trim().parse().map_err(|_| {
                Error::flag(
                    flag,
                    format!("`{s}`: expected every:N with N a whole number"),
                )
            })?;
            if n < 2 {
                return Err(Error::flag(
                    flag,
                    format!("`{s}`: N must be at least 2 (every:1 would leave no Liger layer)"),
                ));
            }
            return Ok(Self::Every(n));
        }
        let layers = s
            .split(',')
            .map(|p| {
                p.trim().parse::<usize>().map_err(|_| {
                    Error::flag(
                        flag,
                        format!(
                            "`{p}` is not a layer index (expected a list like 0,7,15 or every:N)"
                        ),
                    )
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self::List(layers))
    }
}

impl FullAttention {
    /// The selected layer indices (sorted) for a model with `num_layers` layers.
    pub fn layers(&self, num_layers: usize) -> Result<Vec<usize>> {
        let flag = "--full-attention-layers";
        let mut layers = match self {
            Self::None => Vec::new(),
            Self::List(l) => l.clone(),
            Self::Every(n) => {
                if *n > num_layers {
                    return Err(Error::flag(
                        flag,
                        format!("every:{n} selects no layer of a model with {num_layers} layers"),
                    ));
                }
                (n - 1..num_layers).step_by(*n).collect()
            }
        };
        layers.sort_unstable();
        if let Some(&bad) = layers.iter().find(|&&i| i >= num_layers) {
            return Err(Error::flag(
                flag,
                format!(
                    "layer {bad} is out of range (the model has {num_layers} layers: 0..={})",
                    num_layers - 1
                ),
            ));
        }
        if let Some(w) = layers.windows(2).find(|w| w[0] == w[1]) {
            return Err(Error::flag(flag, format!("layer {} is listed twice", w[0])));
        }
        if layers.len() == num_layers {
            return Err(Error::flag(
                flag,
                "every layer would keep full attention; nothing would be converted",
            ));
        }
        Ok(layers)
    }
}

/// The conversion flags. `Default` reproduces Liger-GLA exactly (LIGER.md §1).
#[derive(Debug, Clone, PartialEq)]
pub struct LigerSettings {
    pub variant: Variant,
    /// Keys each query sees besides itself in the sliding-window branch.
    pub window: usize,
    /// Weight of the recurrent branch; the window branch gets `1 - mix`. `None`: 0.5/0.5.
    pub mix: Option<f64>,
    /// Log-gate divisor; `None`: the variant's default.
    pub gate_normalizer: Option<f64>,
    pub full_attention: FullAttention,
    /// GSA's slot count; `None`: 64. Only with GSA.
    pub slots: Option<usize>,
    /// Global cache places per KV head and layer (0: none), of which `sinks` hold the
    /// first tokens.
    pub global_cache: usize,
    pub sinks: usize,
    /// Of the places beyond the sinks, how many go by attention (the rest by recall).
    pub attention_places: usize,
    /// The distance cap of the global cache's entries: `None` picks half the model's
    /// `max_position_embeddings` when there is a global cache, `Some(0)` turns it off.
    pub max_distance: Option<usize>,
    /// How states store the rows they keep; `None`: the model's dtype.
    pub kv_dtype: Option<KvDtype>,
}

impl Default for LigerSettings {
    fn default() -> Self {
        let d = LigerConfig::default();
        Self {
            variant: d.variant,
            window: d.window,
            mix: None,
            gate_normalizer: None,
            full_attention: FullAttention::None,
            slots: None,
            global_cache: 0,
            sinks: 0,
            attention_places: d.attention_places,
            max_distance: None,
            kv_dtype: None,
        }
    }
}

impl LigerSettings {
    /// Checks every value that does not depend on the model.
    pub fn validate(&self) -> Result<()> {
        if self.window == 0 {
            return Err(Error::flag(
                "--window",
                "must be at least 1 (it counts the keys a query sees besides itself; 64 is the reference)",
            ));
        }
        if let Some(m) = self.mix {
            if !(m.is_finite() && (0.0..=1.0).contains(&m)) {
                return Err(Error::flag(
                    "--mix",
                    format!("{m} is outside 0..=1 (it is the recurrent branch's weight)"),
                ));
            }
        }
        if let Some(m) = self.slots {
            if self.variant != Variant::Gsa {
                return Err(Error::flag(
                    "--slots",
                    format!(
                        "only --variant gsa has slots (this is {})",
                        variant_name(self.variant)
                    ),
                ));
            }
            if m == 0 {
                return Err(Error::flag("--slots", "must be at least 1"));
            }
        }
        if self.sinks > self.global_cache {
            return Err(Error::flag(
                "--sinks",
                format!(
                    "{} sinks need as many places: add --global-cache {} or more",
                    self.sinks, self.sinks
                ),
            ));
        }
        if self.sinks + self.attention_places > self.global_cache {
            return Err(Error::flag(
                "--attention-places",
                format!(
                    "{} attention places and {} sinks need as many places: add --global-cache {} or more",
                    self.attention_places,
                    self.sinks,
                    self.sinks + self.attention_places
                ),
            ));
        }
        // The remaining places go to the tokens a d x d memory recalls worst (it is kept for
        // that even with --mix 0); GSA's slot memories have no such recall.
        if self.global_cache > self.sinks + self.attention_places && self.variant == Variant::Gsa {
            return Err(Error::flag(
                "--global-cache",
                "places beyond the sinks and --attention-places are chosen by the gla/hgrn2 \
                 memory's recall; with gsa give them all to attention (--attention-places) or sinks",
            ));
        }
        if let Some(m) = self.max_distance.filter(|&m| m > 0) {
            if m <= self.window {
                return Err(Error::flag(
                    "--max-distance",
                    format!(
                        "{m} must exceed --window {} (it caps the distance of the tokens kept past the window)",
                        self.window
                    ),
                ));
            }
        }
        if let Some(g) = self.gate_normalizer {
            if !(g.is_finite() && g > 0.0) {
                return Err(Error::flag(
                    "--gate-normalizer",
                    format!("{g} must be a positive number"),
                ));
            }
        }
        Ok(())
    }

    /// Checks the slot count against the model's head dim: GSA's gate average-pools the
    /// head dim into equal groups, one per slot.
    pub fn check_slots(&self, head_dim: usize) -> Result<()> {
        if self.variant != Variant::Gsa {
            return Ok(());
        }
        let m = self.slots.unwrap_or(DEFAULT_SLOTS);
        if !slots_fit(m, head_dim) {
            return Err(Error::flag(
                "--slots",
                format!(
                    "{m} does not divide the model's head dim {head_dim} (the gate pools the \
                     head dim into one equal group per slot; {head_dim} makes pooling the identity)"
                ),
            ));
        }
        Ok(())
    }

    /// The distance cap for a model trained on `max_positions` tokens: kept tokens are
    /// scored at most half that far back by default (measured on SmolLM2, whose 8,192:
    /// 4,096 finds every pass key at 16K tokens, none without a cap), never within the
    /// window.
    pub fn max_distance(&self, max_positions: usize) -> Option<usize> {
        match self.max_distance {
            Some(0) => None,
            Some(m) => Some(m),
            None if self.global_cache > 0 => Some((max_positions / 2).max(self.window + 1)),
            None => None,
        }
    }

    /// The `liger` config section for a model with `num_layers` layers trained on
    /// `max_positions` tokens; `source` is recorded.
    pub fn to_liger_config(
        &self,
        (num_layers, max_positions): (usize, usize),
        source: Option<&str>,
    ) -> Result<LigerConfig> {
        self.validate()?;
        let recurrent = self.mix.unwrap_or(0.5);
        Ok(LigerConfig {
            variant: self.variant,
            window: self.window,
            window_weight: 1.0 - recurrent,
            recurrent_weight: recurrent,
            gate_normalizer: self
                .gate_normalizer
                .unwrap_or_else(|| self.variant.default_gate_normalizer()),
            full_attention_layers: self.full_attention.layers(num_layers)?,
            slots: (self.variant == Variant::Gsa).then(|| self.slots.unwrap_or(DEFAULT_SLOTS)),
            global_cache: self.global_cache,
            sinks: self.sinks,
            attention_places: self.attention_places,
            max_distance: self.max_distance(max_positions),
            kv_dtype: self.kv_dtype,
            source: source.map(str::to_owned),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_liger_gla() {
        let c = LigerSettings::default()
            .to_liger_config((30, 8192), None)
            .unwrap();
        assert_eq!(c, LigerConfig::default());
    }

    #[test]
    fn a_global_cache_gets_a_distance_cap_unless_told_otherwise() {
        let with_cache = LigerSettings {
            window: 240,
            global_cache: 80,
            ..Default::default()
        };
        let cap = |s: &LigerSettings, positions| {
            s.to_liger_config((30, positions), None)
                .unwrap()
                .max_distance
        };
        assert_eq!(cap(&with_cache, 8192), Some(4096));
        // Never within the window.
        assert_eq!(cap(&with_cache, 256), Some(241));
        let off = LigerSettings {
            max_distance: Some(0),
            ..with_cache.clone()
        };
        assert_eq!(cap(&off, 8192), None);
        let set = LigerSettings {
            max_distance: Some(1000),
            ..with_cache.clone()
        };
        assert_eq!(cap(&set, 8192), Some(1000));
        // No global cache: nothing to cap.
        assert_eq!(cap(&LigerSettings::default(), 8192), None);
    }

    #[test]
    fn hgrn2_gets_its_own_normalizer_and_mix_splits() {
        let s = LigerSettings {
            variant: Variant::Hgrn2,
            mix: Some(0.25),
            ..Default::default()
        };
        let c = s.to_liger_config((4, 8192), Some("x")).unwrap();
        assert_eq!(c.gate_normalizer, 1.0);
        assert_eq!((c.window_weight, c.recurrent_weight), (0.75, 0.25));
        assert_eq!(c.source.as_deref(), Some("x"));
    }

    #[test]
    fn layer_rules() {
        let every: FullAttention = "every:8".parse().unwrap();
        assert_eq!(every.layers(32).unwrap(), vec![7, 15, 23, 31]);
        assert_eq!(every.layers(30).unwrap(), vec![7, 15, 23]);
        let list: FullAttention = " 15, 0,7".parse().unwrap();
        assert_eq!(list.layers(16).unwrap(), vec![0, 7, 15]);
        assert!(list
            .layers(15)
            .unwrap_err()
            .to_string()
            .contains("layer 15 is out of range"));
        assert!("0,0".parse::<FullAttention>().unwrap().layers(3).is_err());
        assert!("every:1".parse::<FullAttention>().is_err());
        assert!("every:x".parse::<FullAttention>().is_err());
        assert!("1;2".parse::<FullAttention>().is_err());
        assert!("0,1".parse::<FullAttention>().unwrap().layers(2).is_err());
        assert_eq!("".parse::<FullAttention>().unwrap(), FullAttention::None);
    }

    #[test]
    fn bad_values() {
        let bad = |s: LigerSettings| s.validate().unwrap_err().to_string();
        assert!(bad(LigerSettings {
            window: 0,
            ..Default::default()
        })
        .contains("--window"));
        assert!(bad(LigerSettings {
            mix: Some(1.5),
            ..Default::default()
        })
        .contains("--mix"));
        assert!(bad(LigerSettings {
            mix: Some(f64::NAN),
            ..Default::default()
        })
        .contains("--mix"));
        assert!(bad(LigerSettings {
            gate_normalizer: Some(0.0),
            ..Default::default()
        })
        .contains("--gate-normalizer"));
    }
}
