"""The operator console: a web page over the operator database role (reads, with row level
security per business number) and the services' gRPC APIs (actions), for the people who run
a WhatsApp business number."""
