"""Prompt language and CLIP conditioning: parse, schedule, prepare, chunk, encode."""

from voidprompt.prompts.chunks import PromptChunk, TokenizedLine, token_report, tokenize_line
from voidprompt.prompts.embeddings import Embedding, EmbeddingDatabase
from voidprompt.prompts.encode import PromptEncoder
from voidprompt.prompts.encode_sdxl import SDXLPromptEncoder
from voidprompt.prompts.parse import parse_prompt_attention
from voidprompt.prompts.prepare import prepare_prompts
from voidprompt.prompts.schedule import prompt_schedules

__all__ = [
    "Embedding",
    "EmbeddingDatabase",
    "PromptChunk",
    "PromptEncoder",
    "SDXLPromptEncoder",
    "TokenizedLine",
    "parse_prompt_attention",
    "prepare_prompts",
    "prompt_schedules",
    "token_report",
    "tokenize_line",
]
