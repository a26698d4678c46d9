"""``with_structured_output`` for ChatThaw: JSON schema (guided decoding), JSON mode, tool calling."""

from __future__ import annotations

from operator import itemgetter
from typing import TYPE_CHECKING, Any

from langchain_core.output_parsers import JsonOutputKeyToolsParser, JsonOutputParser, PydanticOutputParser
from langchain_core.output_parsers.openai_tools import PydanticToolsParser
from langchain_core.runnables import Runnable, RunnableLambda, RunnableMap, RunnablePassthrough
from langchain_core.utils.function_calling import convert_to_json_schema, convert_to_openai_tool
from pydantic import BaseModel

if TYPE_CHECKING:
    from .langchain import ChatThaw

__all__ = ["structured_output_runnable"]


def _is_pydantic(schema: Any) -> bool:
    from pydantic import v1

    return isinstance(schema, type) and issubclass(schema, (BaseModel, v1.BaseModel))


def structured_output_runnable(
    llm: ChatThaw, schema: Any, *, method: str, include_raw: bool, **kwargs: Any
) -> Runnable:
    if kwargs:
        raise ValueError(f"unexpected arguments: {sorted(kwargs)}")
    if schema is None and method != "json_mode":
        raise ValueError(f"method={method!r} needs a schema")
    pydantic = _is_pydantic(schema)
    trace = {"kwargs": {"method": method}, "schema": schema}
    if method == "json_schema":
        json_schema = convert_to_json_schema(schema)
        bound = llm.bind(structured_outputs={"json": json_schema}, ls_structured_output_format=trace)
        parser: Runnable = PydanticOutputParser(pydantic_object=schema) if pydantic else JsonOutputParser()
    elif method == "json_mode":
        bound = llm.bind(structured_outputs={"json_object": True}, ls_structured_output_format=trace)
        parser = PydanticOutputParser(pydantic_object=schema) if pydantic else JsonOutputParser()
    elif method == "function_calling":
        tool = convert_to_openai_tool(schema)
        name = tool["function"]["name"]
        bound = llm.bind_tools([tool], tool_choice=name, ls_structured_output_format=trace)
        parser = (
            PydanticToolsParser(tools=[schema], first_tool_only=True)
            if pydantic
            else JsonOutputKeyToolsParser(key_name=name, first_tool_only=True)
        )
    else:
        raise ValueError(f"method must be 'json_schema', 'json_mode' or 'function_calling', not {method!r}")
    if not include_raw:
        return bound | parser
    parse = RunnablePassthrough.assign(parsed=itemgetter("raw") | parser, parsing_error=lambda _: None)
    on_error = RunnablePassthrough.assign(parsed=lambda _: None)

    def with_error(inputs: dict[str, Any]) -> dict[str, Any]:
        try:
            return parse.invoke(inputs)
        except Exception as exc:  # the caller asked for the raw message and the error
            return {**on_error.invoke(inputs), "parsing_error": exc}

    return RunnableMap(raw=bound) | RunnableLambda(with_error)
