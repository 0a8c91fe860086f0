//! How the next token is drawn (`PROTOCOL.md` §4.4): the sampling
//! parameters of a sequence. 1.3 adds vLLM's options; each is left out of
//! an encoded request when it holds its default, so that a request that
//! uses none of them has the bytes of 1.2.

use serde::{Deserialize, Serialize};

/// Temperature 0 is greedy (ties go to the lowest token id). With a
/// temperature, the draw uses a counter-based random stream keyed by the
/// seed and the token's position, so the same request gives the same token
/// on every backend.
///
/// Before the draw, in vLLM's order: the logit bias is added, then the
/// repetition penalty (prompt and output tokens), the frequency and presence
/// penalties (output tokens only); greedy takes the arg-max of that; then
/// temperature, `min_p`, `top_k`, `top_p`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    #[serde(default)]
    pub temperature: f32,
    #[serde(default = "one")]
    pub top_p: f32,
    /// 0 means no top-k cut.
    #[serde(default)]
    pub top_k: u32,
    /// The draw's key. Absent (1.3): the daemon picks a fresh random seed
    /// for the sequence, so that unseeded sequences and forks differ;
    /// `sequence_state` reports the seed it picked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// How many top log-probabilities to return with each sampled token.
    #[serde(default)]
    pub logprobs: u32,
    /// (1.3) Tokens whose probability (after temperature) is below `min_p`
    /// times the best token's are cut; 0 cuts nothing.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub min_p: f32,
    /// (1.3) Subtracted from the logit of every token the output holds.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub presence_penalty: f32,
    /// (1.3) Subtracted, times its count in the output, from each logit.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub frequency_penalty: f32,
    /// (1.3) For every token of the prompt or the output: a positive logit
    /// is divided by it, a negative one multiplied; 1 changes nothing.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub repetition_penalty: f32,
    /// (1.3) `[token, bias]` pairs added to the logits before anything else.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub logit_bias: Vec<(u32, f32)>,
    /// (1.3) Return, for each prompt token a step appends, its
    /// log-probability and this many most likely tokens there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_logprobs: Option<u32>,
}

/// A prompt token's log-probability given the tokens before it, and the
/// most likely tokens at its position as `(token, logprob)`, best first.
pub type PromptLogprob = (f32, Vec<(u32, f32)>);

fn one() -> f32 {
    1.0
}

fn is_zero(x: &f32) -> bool {
    *x == 0.0
}

fn is_one(x: &f32) -> bool {
    *x == 1.0
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: None,
            logprobs: 0,
            min_p: 0.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            logit_bias: vec![],
            prompt_logprobs: None,
        }
    }
}

impl SamplingParams {
    /// Whether any option beyond temperature, `top_p`, `top_k`, seed and
    /// logprobs is in use (the options 1.3 added).
    pub fn uses_processing(&self) -> bool {
        self.min_p != 0.0
            || self.presence_penalty != 0.0
            || self.frequency_penalty != 0.0
            || self.repetition_penalty != 1.0
            || !self.logit_bias.is_empty()
    }
}
