"""The HTTP API's request and response schemas (pydantic), with every field bounded by the
service's ServeLimits, so a bad request is refused at the edge with a message naming the field,
and the bounds show in the OpenAPI document at /docs."""

from __future__ import annotations

from typing import Annotated, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, create_model, model_validator

from rag_ray.config import ServeLimits

#: HTTP decoding names -> (RagModel mode, decoding)
DECODINGS = {
    "token-greedy": ("token", "greedy"),
    "token-beam": ("token", "beam"),
    "sequence-fast": ("sequence", "fast"),
    "sequence-thorough": ("sequence", "thorough"),
}
Decoding = Literal["token-greedy", "token-beam", "sequence-fast", "sequence-thorough"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt field is an error, not silently ignored


class _OneOrMany(_Strict):
    @model_validator(mode="after")
    def _exactly_one(self):
        if (self.question is None) == (self.questions is None):
            raise ValueError("give exactly one of 'question' (a string) or 'questions' (a list of strings)")
        return self

    @property
    def all_questions(self) -> list[str]:
        return [self.question] if self.question is not None else list(self.questions)


def request_models(limits: ServeLimits) -> tuple[type[BaseModel], type[BaseModel]]:
    """(AnswerRequest, RetrieveRequest) bounded by ``limits``."""
    question = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1,
                                                max_length=limits.max_question_chars)]
    questions = Annotated[list[question], Field(min_length=1, max_length=limits.max_questions)]
    common = {
        "question": (Optional[question], Field(None, description="one question")),
        "questions": (Optional[questions], Field(None, description="several questions, answered as a batch")),
    }
    answer = create_model(
        "AnswerRequest", __base__=_OneOrMany, **common,
        n_docs=(Optional[int], Field(None, ge=1, le=limits.max_n_docs, description="passages to read (K)")),
        decoding=(Optional[Decoding], Field(None, description="default: the model's own mode and decoding")),
        num_beams=(Optional[int], Field(None, ge=1, le=limits.max_num_beams)),
        max_new_tokens=(Optional[int], Field(None, ge=1, le=limits.max_new_tokens)),
        hybrid=(Optional[bool], Field(None, description="also BM25 candidates, fused by reciprocal rank "
                                                         "(default: the service's hybrid setting)")),
    )
    retrieve = create_model(
        "RetrieveRequest", __base__=_OneOrMany, **common,
        k=(int, Field(5, ge=1, le=limits.max_k, description="passages per question")),
        hybrid=(Optional[bool], Field(None, description="also BM25 candidates, fused by reciprocal rank "
                                                         "(default: the service's hybrid setting)")),
    )
    return answer, retrieve


class PassageOut(BaseModel):
    passage_id: str
    doc_id: str
    title: str
    text: str
    score: float = Field(description="q·d, the retrieval score")
    source: str = Field("dense", description="which candidate list found it: dense, lexical or both")
    prior: Optional[float] = Field(None, description="p(z|x)")
    posterior: Optional[float] = Field(None, description="p(z|x, answer)")


class AnswerOut(BaseModel):
    question: str
    answer: str
    score: float = Field(description="log p(answer | question)")
    passages: list[PassageOut]
    index_version: str
    timings_ms: dict[str, float]


class AnswersOut(BaseModel):
    answers: list[AnswerOut]
    index_version: str


class RetrieveOut(BaseModel):
    questions: list[str]
    passages: list[list[PassageOut]]
    index_version: str
    timings_ms: dict[str, float]


class SwapRequest(_Strict):
    index_dir: Annotated[str, StringConstraints(min_length=1, max_length=4096)]


def decode_params(req) -> dict:
    """RagPipeline.read keyword arguments for an AnswerRequest (None: the model's default)."""
    mode, decoding = DECODINGS[req.decoding] if req.decoding else (None, None)
    return {"mode": mode, "decoding": decoding, "n_docs": req.n_docs, "num_beams": req.num_beams,
            "max_new_tokens": req.max_new_tokens, "hybrid": req.hybrid}
