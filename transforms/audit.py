"""Audit records: per anomaly, what the model saw and which model version flagged it.

With ``--audit_topic`` the scoring step writes, next to each anomalous score,
an AuditRecord (schemas/audit_record.avsc) with the event's validated
readings, the features that were imputed, the score, threshold and
contributions, and the model version. The audit message acknowledges no
input position of its own: it leaves in the same bundle as its score, whose
acknowledgement waits for the whole bundle to be flushed, so an audit record
is on the broker before the offset of its event is committed (at-least-once,
like the scores).
"""

from __future__ import annotations

AUDIT = "audit"  # the OutgoingMessage stream of audit records


def audit_record(score: dict, readings: dict) -> dict:
    """The AuditRecord of one scored event from its SensorScore record and its readings."""
    fields = ("event_id", "device_id", "event_time", "imputed", "score", "threshold", "contributions",
              "model_version", "processed_at")
    return {**{name: score[name] for name in fields}, "readings": dict(readings)}
