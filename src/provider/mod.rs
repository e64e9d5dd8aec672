//! The OpenAI-compatible provider client: profiles, the endpoint guard, retry policy, and
//! the built-in fake provider used by `demo` and `bench`.

pub mod client;
pub mod fake;
pub mod guard;
pub mod http;
pub mod proxy;
pub mod retry;

pub use client::{
    ChatMessage, ChatReply, ChatRequest, ProviderClient, ProviderTarget, ResponseFormat,
};
pub use retry::{ErrorClass, ProviderError};

/// A provider profile: how to address a family of OpenAI-compatible APIs and what they accept.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Profile {
    /// api.openai.com and anything that speaks its API fully.
    Openai,
    /// Azure OpenAI: base URL is the deployment URL, `api-version` query, `api-key` header.
    Azure,
    /// Ollama's OpenAI-compatible endpoint; no API key.
    Ollama,
    /// DeepSeek: JSON mode but no JSON Schema mode.
    Deepseek,
    /// vLLM's OpenAI-compatible server.
    Vllm,
    /// Any other OpenAI-compatible server; structured output through the prompt only.
    Generic,
}

/// How a profile can be asked for structured output, best first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StructuredMode {
    JsonSchema,
    JsonObject,
    Prompt,
}

impl Profile {
    pub const ALL: [Profile; 6] = [
        Profile::Openai,
        Profile::Azure,
        Profile::Ollama,
        Profile::Deepseek,
        Profile::Vllm,
        Profile::Generic,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Profile::Openai => "openai",
            Profile::Azure => "azure",
            Profile::Ollama => "ollama",
            Profile::Deepseek => "deepseek",
            Profile::Vllm => "vllm",
            Profile::Generic => "generic",
        }
    }

    pub fn parse(text: &str) -> Option<Profile> {
        Profile::ALL
            .into_iter()
            .find(|profile| profile.as_str() == text)
    }

    /// Whether this profile needs an API key.
    pub fn requires_key(self) -> bool {
        !matches!(self, Profile::Ollama | Profile::Vllm)
    }

    /// The structured-output mode to ask for.
    pub fn structured_mode(self) -> StructuredMode {
        match self {
            Profile::Openai | Profile::Azure | Profile::Vllm => StructuredMode::JsonSchema,
            Profile::Deepseek | Profile::Ollama => StructuredMode::JsonObject,
            Profile::Generic => StructuredMode::Prompt,
        }
    }
}
