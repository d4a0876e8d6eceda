"""initaudit: will this network start training? Analytic FM1/FM2 checks at initialization."""

__version__ = "0.1.0"
