"""Code shared by the producer, the consumer and the gateway of message-sender."""
