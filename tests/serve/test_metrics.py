"""Server metrics' counters export every known label value at 0 from start-up."""

from collections import defaultdict

from kiln.serve.metrics import ERROR_STATUSES, REJECT_REASONS, ServerMetrics


def test_known_labels_are_exported_at_zero_before_any_request():
    """A series born at its first increment hides that increment from Prometheus' rate() (and
    the alert rules built on it): every label value the server can give is there at 0."""
    text = ServerMetrics(lambda: defaultdict(int)).render().decode()  # an idle engine's stats
    for reason in REJECT_REASONS:
        assert f'kiln:request_rejected_total{{reason="{reason}"}} 0.0' in text
    for status in ERROR_STATUSES:
        assert f'kiln:request_errors_total{{status="{status}"}} 0.0' in text
    assert 'kiln:request_success_total{finished_reason="length"} 0.0' in text
