"""What the OpenAI handlers share: tokenizer, limits, engine client, and the served model's name and size."""
import asyncio
from dataclasses import dataclass, field

from slimserve.config import ServeConfig
from slimserve.serve.errors import APIError
from slimserve.serve.generation import EngineClient
from slimserve.tokenizer import Tokenizer


@dataclass
class ServingContext:
    tokenizer: Tokenizer
    config: ServeConfig
    client: EngineClient
    model_name: str
    max_model_len: int
    vocab_size: int  # the model's, which may exceed the tokenizer's (padded embeddings)
    _token_texts: dict[int, str] = field(default_factory=dict, repr=False)

    def check_model(self, requested: str | None) -> None:
        if requested is not None and requested != self.model_name:
            raise APIError(404, f"The model `{requested}` does not exist; this server serves `{self.model_name}`",
                           "model", "model_not_found")

    async def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Off the event loop: a prompt of a few MB takes long enough to stall every stream."""
        return await asyncio.to_thread(self.tokenizer.encode, text, add_special_tokens)

    def token_text(self, token_id: int) -> str:
        """One token's text as logprobs show it (a byte-level piece of a character shows as U+FFFD)."""
        if token_id not in self._token_texts:
            self._token_texts[token_id] = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return self._token_texts[token_id]
