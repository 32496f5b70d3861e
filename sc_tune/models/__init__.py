"""Model families implemented natively in this project (no ``trust_remote_code``)."""
