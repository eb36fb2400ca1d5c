"""The publisher of one DP group: schedules its requests and broadcasts ordered steps."""
