"""Sluice: Kafka-native inference for small transformer models (control plane)."""

__version__ = "0.1.0"
