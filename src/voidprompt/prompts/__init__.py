"""Prompt language and CLIP conditioning: parse, schedule, prepare, tokenize, chunk, encode."""

from voidprompt.prompts.chunks import PromptChunk, TokenizedLine, token_report, tokenize_line
from voidprompt.prompts.embeddings import Embedding, EmbeddingDatabase
from voidprompt.prompts.encode import PromptEncoder
from voidprompt.prompts.parse import parse_prompt_attention
from voidprompt.prompts.prepare import prepare_prompts
from voidprompt.prompts.schedule import prompt_schedules
from voidprompt.prompts.tokenizer import ClipTokenizer, load_clip_tokenizer

__all__ = [
    "ClipTokenizer",
    "Embedding",
    "EmbeddingDatabase",
    "PromptChunk",
    "PromptEncoder",
    "TokenizedLine",
    "load_clip_tokenizer",
    "parse_prompt_attention",
    "prepare_prompts",
    "prompt_schedules",
    "token_report",
    "tokenize_line",
]
