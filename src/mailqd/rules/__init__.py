"""The one set of message rules: addresses, headers, text, limits.

Every entry (the client, `mailqctl enqueue` flags and files) and every
reader (the claim-time checks, the composer, the screening, the log masking,
`mailqctl`'s tables) judges a message with these functions, so they cannot
disagree: what the client accepts the daemon sends, and what the daemon
would refuse the client refuses first, with the same message.
"""

from mailqd.rules.addresses import (
    MAX_ADDRESS_LENGTH,
    MAX_DISPLAY_NAME_LENGTH,
    Address,
    envelope_addresses,
    format_address,
    parse_address_list,
    parse_recipients,
    parse_single_address,
)
from mailqd.rules.attachments import (
    AttachmentLike,
    check_attachments,
    check_content_id,
    check_content_type,
    check_filename,
)
from mailqd.rules.domains import DNS_LABEL, ascii_dns_name, is_dns_name, is_mail_domain
from mailqd.rules.headers import (
    MAX_LINE_LENGTH,
    MAX_MESSAGE_ID_LENGTH,
    RESERVED_HEADERS,
    check_extra_headers,
    check_message_id,
)
from mailqd.rules.limits import (
    DEFAULT_LIMITS,
    MAX_ATTEMPTS_RANGE,
    PRIORITY_RANGE,
    Limits,
    check_body_size,
    check_idempotency_key,
    check_max_attempts,
    check_priority,
    check_recipient_count,
    check_subject_length,
    check_timestamp,
)
from mailqd.rules.text import check_header_text, check_json_text, check_text

__all__ = [
    "DEFAULT_LIMITS",
    "DNS_LABEL",
    "MAX_ADDRESS_LENGTH",
    "MAX_ATTEMPTS_RANGE",
    "MAX_DISPLAY_NAME_LENGTH",
    "MAX_LINE_LENGTH",
    "MAX_MESSAGE_ID_LENGTH",
    "PRIORITY_RANGE",
    "RESERVED_HEADERS",
    "Address",
    "AttachmentLike",
    "Limits",
    "ascii_dns_name",
    "check_attachments",
    "check_body_size",
    "check_content_id",
    "check_content_type",
    "check_extra_headers",
    "check_filename",
    "check_header_text",
    "check_idempotency_key",
    "check_json_text",
    "check_max_attempts",
    "check_message_id",
    "check_priority",
    "check_recipient_count",
    "check_subject_length",
    "check_text",
    "check_timestamp",
    "envelope_addresses",
    "format_address",
    "is_dns_name",
    "is_mail_domain",
    "parse_address_list",
    "parse_recipients",
    "parse_single_address",
]
