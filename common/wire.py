"""The domain types of `common/domain.py` as wa.v1 protobuf messages, and back.

Each converter is generated once, at import, from the dataclass's fields and the message's
descriptor, into the same straight-line code one would write by hand (no per-message
reflection): a field of the same name is copied; a `google.protobuf.Timestamp` field is the
domain's seconds (0: unset); an enum field is the domain's lowercase name (`"read"` for
DELIVERY_STATUS_READ, "" for UNSPECIFIED); a `wa.v1.Error` field named `error` is the
domain's `error_class`, `error_message` and `retryable`; a repeated field is a tuple. A field
on one side only is an import error, so a field cannot be dropped silently between the two.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping
from dataclasses import fields
from typing import Any, TypeVar, cast

from google.protobuf.descriptor import EnumDescriptor
from google.protobuf.message import Message as Proto
from google.protobuf.timestamp_pb2 import Timestamp
from wa.v1 import agent_pb2, common_pb2, dlq_pb2

from . import domain

T = TypeVar("T")
P = TypeVar("P", bound=Proto)

_ERROR_FIELDS = ("error_class", "error_message", "retryable")


def enum_names(enum: EnumDescriptor) -> tuple[str, ...]:
    """Each value's domain name by number: MESSAGE_STATUS_DEAD_LETTERED -> "dead_lettered",
    the UNSPECIFIED value -> ""."""
    prefix = "".join("_" + c if c.isupper() else c for c in enum.name).lstrip("_").upper() + "_"
    names = [""] * (max(v.number for v in enum.values) + 1)
    for value in enum.values:
        name = value.name.removeprefix(prefix).lower()
        names[value.number] = "" if name == "unspecified" else name
    return tuple(names)


def enum_numbers(enum: EnumDescriptor) -> dict[str, int]:
    """The inverse of `enum_names`."""
    return {name: number for number, name in enumerate(enum_names(enum))}


def seconds_ts(seconds: int) -> Timestamp | None:
    return Timestamp(seconds=seconds) if seconds else None


def datetime_ts(value: dt.datetime | None) -> Timestamp | None:
    """A database time as a Timestamp (None stays unset)."""
    if value is None:
        return None
    ts = Timestamp()
    ts.FromDatetime(value)
    return ts


def iso(message: Proto, field: str) -> str:
    """`message.<field>`, a Timestamp, as an ISO 8601 time in UTC; "" when it is unset."""
    if not message.HasField(field):
        return ""
    ts: Timestamp = getattr(message, field)
    return ts.ToDatetime(tzinfo=dt.UTC).isoformat()


def error(error_class: str, message: str, retryable: bool) -> common_pb2.Error:
    return common_pb2.Error(error_class=error_class, message=message, retryable=retryable)


def _plan(cls: type, message: Any) -> tuple[list[str], list[str], dict[str, Any]]:
    """(keyword arguments of the proto, keyword arguments of the dataclass, their globals)."""
    domain_fields = {f.name for f in fields(cls)}
    to_proto: list[str] = []
    from_proto: list[str] = []
    env: dict[str, Any] = {"seconds_ts": seconds_ts, "error": error}
    used: set[str] = set()
    for f in message.fields:
        name = f.name
        if f.message_type is not None and f.message_type.full_name == "wa.v1.Error":
            to_proto.append(f"{name}=error(o.error_class, o.error_message, o.retryable)")
            from_proto += [
                f"error_class=p.{name}.error_class",
                f"error_message=p.{name}.message",
                f"retryable=p.{name}.retryable",
            ]
            used.update(_ERROR_FIELDS)
            continue
        if name not in domain_fields:
            raise TypeError(f"{message.full_name}.{name} has no field in {cls.__name__}")
        used.add(name)
        if f.message_type is not None and f.message_type.full_name == "google.protobuf.Timestamp":
            to_proto.append(f"{name}=seconds_ts(o.{name})")
            from_proto.append(f"{name}=p.{name}.seconds")
        elif f.is_repeated:
            # A repeated field is the domain's tuple (a frozen dataclass holds no container).
            to_proto.append(f"{name}=o.{name}")
            from_proto.append(f"{name}=tuple(p.{name})")
        elif f.enum_type is not None:
            env[f"{name}_numbers"] = enum_numbers(f.enum_type)
            env[f"{name}_names"] = enum_names(f.enum_type)
            to_proto.append(f"{name}={name}_numbers[o.{name}]")
            from_proto.append(f"{name}={name}_names[p.{name}]")
        else:
            to_proto.append(f"{name}=o.{name}")
            from_proto.append(f"{name}=p.{name}")
    missing = domain_fields - used
    if missing:
        raise TypeError(f"{cls.__name__} fields not in {message.full_name}: {sorted(missing)}")
    return to_proto, from_proto, env


def _compile(name: str, source: str, env: dict[str, Any]) -> Callable[[Any], Any]:
    namespace = dict(env)
    exec(compile(source, f"<wire {name}>", "exec"), namespace)
    function: Callable[[Any], Any] = namespace[name]
    return function


def to_proto(cls: type, proto: type[P]) -> Callable[[Any], P]:
    """`f(o) -> proto` for an instance of `cls` (or of a subclass: only `cls`'s fields)."""
    args, _, env = _plan(cls, proto.DESCRIPTOR)
    env["P"] = proto
    return _compile("convert", "def convert(o):\n    return P(" + ", ".join(args) + ")\n", env)


def from_proto(proto: type[Proto], cls: type[T]) -> Callable[[Any], T]:
    """`f(p) -> cls` for a message of type `proto`."""
    _, args, env = _plan(cls, proto.DESCRIPTOR)
    env["C"] = cls
    return _compile("convert", "def convert(p):\n    return C(" + ", ".join(args) + ")\n", env)


# The gateway and the state service: a delivery's events.
message_to_proto = to_proto(domain.Message, common_pb2.InboundMessage)
message_from_proto = from_proto(common_pb2.InboundMessage, domain.Message)
status_to_proto = to_proto(domain.Status, common_pb2.StatusUpdate)
status_from_proto = from_proto(common_pb2.StatusUpdate, domain.Status)
event_to_proto = to_proto(domain.Event, common_pb2.CustomerEvent)
event_from_proto = from_proto(common_pb2.CustomerEvent, domain.Event)

# The state and agent services: a turn, and how it ended.
turn_to_proto = to_proto(domain.TurnRequest, agent_pb2.ReplyRequest)
turn_from_proto = from_proto(agent_pb2.ReplyRequest, domain.TurnRequest)
result_to_proto = to_proto(domain.TurnResult, agent_pb2.ReplyResponse)
result_from_proto = from_proto(agent_pb2.ReplyResponse, domain.TurnResult)

# The state and dlq services: a failure.
failure_to_proto = to_proto(domain.Failure, dlq_pb2.EnqueueRequest)
failure_from_proto = from_proto(dlq_pb2.EnqueueRequest, domain.Failure)

MESSAGE_STATUS: tuple[str, ...] = enum_names(common_pb2.MessageStatus.DESCRIPTOR)
MESSAGE_STATUS_NUMBER = cast(
    Mapping[str, common_pb2.MessageStatus],
    enum_numbers(common_pb2.MessageStatus.DESCRIPTOR),
)
DLQ_STATUS: tuple[str, ...] = enum_names(dlq_pb2.DlqStatus.DESCRIPTOR)
DLQ_STATUS_NUMBER = cast(
    Mapping[str, dlq_pb2.DlqStatus], enum_numbers(dlq_pb2.DlqStatus.DESCRIPTOR)
)

# `Agent.Turns`: the metadata with which a caller asks for several answers per TurnsResponse,
# and the agent's initial metadata saying it reads several turns per TurnsRequest (`more`,
# protos/wa/v1/agent.proto). A peer of an earlier release sends neither: one turn a message.
TURNS_MORE = ("wa-turns-more", "1")


def cleared_count(table_name: str) -> bool:
    """Whether a retention count (`TableCount.table_name`) is of values cleared in rows that
    stay, named `table.column` (a customer's name kept no longer), not of rows deleted."""
    return "." in table_name
