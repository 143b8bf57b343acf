-- moonshard.models.mistral: Mistral. Llama's weights and math; its attention may look back only
-- `sliding_window` positions (config.json). The attention ops attend over the whole context, so
-- a context longer than the window is refused by the runner (moonshard.runner) and the default
-- context is the window: within it, sliding-window attention and full attention are the same.
-- llama.cpp writes Mistral GGUF files under the llama architecture.
local llama = require "moonshard.models.llama"

local M = {}

M.arch = llama.derive {
  name = "mistral",
  hf_model_types = { "mistral" }, hf_architectures = { "MistralForCausalLM" },
  gguf_arch = "llama", gguf_alias = true,
}

M.layer, M.forward, M.logits = llama.layer, llama.forward, llama.logits

return M
