"""The reward API's generated code is fresh, and its surface (methods, fields, numbers, types) is
frozen: a change here must be deliberate (a new field number, never a reused one)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from google.protobuf.descriptor import FieldDescriptor

from grmserve.protos import PROTO_FILE, SERVICE_NAME, reward_pb2, reward_pb2_grpc

REPO = Path(__file__).resolve().parents[2]
GENERATE = REPO / "protos" / "generate.py"

FROZEN_SERVICE = {
    "Score": ("ScoreRequest", "ScoreResponse"),
    "ScoreCandidates": ("ScoreCandidatesRequest", "ScoreCandidatesResponse"),
    "Info": ("InfoRequest", "InfoResponse"),
}
# message -> field -> (number, type, repeated, oneof)
FROZEN_MESSAGES = {
    "ChatMessage": {"role": (1, "string", False, None), "content": (2, "string", False, None)},
    "ChatMessages": {"messages": (1, "ChatMessage", True, None)},
    "Prompt": {"text": (1, "string", False, "kind"), "messages": (2, "ChatMessages", False, "kind")},
    "Pair": {"prompt": (1, "Prompt", False, None), "response": (2, "string", False, None)},
    "ScoreRequest": {
        "pairs": (1, "Pair", True, None),
        "truncate": (2, "bool", False, None),
        "request_id": (3, "string", False, None),
    },
    "ScoreResponse": {"scores": (1, "float", True, None), "metadata": (2, "CallMetadata", False, None)},
    "ScoreCandidatesRequest": {
        "prompt": (1, "Prompt", False, None),
        "responses": (2, "string", True, None),
        "truncate": (3, "bool", False, None),
        "request_id": (4, "string", False, None),
    },
    "ScoreCandidatesResponse": {
        "scores": (1, "float", True, None),
        "best_index": (2, "uint32", False, None),
        "metadata": (3, "CallMetadata", False, None),
    },
    "CallMetadata": {
        "request_id": (1, "string", False, None),
        "sequence_tokens": (2, "uint32", True, None),
        "truncated": (3, "bool", True, None),
        "computed_tokens": (4, "uint64", False, None),
        "queue_seconds": (5, "double", False, None),
        "compute_seconds": (6, "double", False, None),
    },
    "InfoRequest": {},
    "InfoResponse": {
        "model_name": (1, "string", False, None),
        "model_version": (2, "string", False, None),
        "precision": (3, "string", False, None),
        "max_tokens": (4, "uint32", False, None),
        "max_pairs_per_request": (5, "uint32", False, None),
        "max_candidates": (6, "uint32", False, None),
        "head_type": (7, "string", False, None),
        "checkpoint_format": (8, "string", False, None),
        "chat_template": (9, "bool", False, None),
        "server_version": (10, "string", False, None),
        "device": (11, "string", False, None),
        "max_message_bytes": (12, "uint64", False, None),
    },
}

_TYPE_NAMES = {getattr(FieldDescriptor, n): n[len("TYPE_"):].lower() for n in dir(FieldDescriptor)
               if n.startswith("TYPE_")}


def field_signature(f: FieldDescriptor) -> tuple:
    kind = f.message_type.name if f.message_type is not None else _TYPE_NAMES[f.type]
    return f.number, kind, f.is_repeated, f.containing_oneof.name if f.containing_oneof else None


def test_generated_code_is_fresh():
    result = subprocess.run([sys.executable, str(GENERATE), "--check"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_check_detects_stale_code(tmp_path):
    """--check can fail: edit a generated file in a copy of protos/ and it reports it."""
    copy = tmp_path / "protos"
    shutil.copytree(REPO / "protos", copy, ignore=shutil.ignore_patterns("__pycache__"))
    stale = copy / "grmserve" / "reward" / "v1" / "reward_pb2_grpc.py"
    stale.write_text(stale.read_text() + "\n# edited by hand\n")
    result = subprocess.run([sys.executable, str(copy / "generate.py"), "--check"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1
    assert "reward_pb2_grpc.py" in result.stderr


def test_service_surface_is_frozen():
    assert reward_pb2.DESCRIPTOR.package == "grmserve.reward.v1"
    assert SERVICE_NAME == "grmserve.reward.v1.RewardService"
    assert list(reward_pb2.DESCRIPTOR.services_by_name) == ["RewardService"]
    service = reward_pb2.DESCRIPTOR.services_by_name["RewardService"]
    methods = {m.name: (m.input_type.name, m.output_type.name) for m in service.methods}
    assert methods == FROZEN_SERVICE
    assert not any(m.client_streaming or m.server_streaming for m in service.methods)
    assert (hasattr(reward_pb2_grpc, "RewardServiceStub")
            and hasattr(reward_pb2_grpc, "add_RewardServiceServicer_to_server"))


def test_message_surface_is_frozen():
    messages = {
        name: {f.name: field_signature(f) for f in desc.fields}
        for name, desc in reward_pb2.DESCRIPTOR.message_types_by_name.items()
    }
    assert messages == FROZEN_MESSAGES


def test_proto_file_ships_beside_the_generated_code():
    assert PROTO_FILE.is_file()
    assert "package grmserve.reward.v1;" in PROTO_FILE.read_text()
