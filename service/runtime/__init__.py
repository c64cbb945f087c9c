"""Running work on the devices: the batch queues, the device lanes, the batch processor and the metrics.
Imports only `service.model` (and the configuration): what runs on it (explanations) brings its own handler."""
