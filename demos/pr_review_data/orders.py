"""Order storage and pricing for a small shop (the code under review, before the change)."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from decimal import Decimal


@dataclass(frozen=True)
class Order:
    order_id: int
    customer: str
    items: tuple[tuple[str, int, Decimal], ...]  # (sku, quantity, unit price)

    @property
    def total(self) -> Decimal:
        return sum((qty * price for _, qty, price in self.items), Decimal("0"))


class OrderStore:
    """Orders in a SQLite database."""

    def __init__(self, path: str) -> None:
        self._db = sqlite3.connect(path)
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS orders (id INTEGER PRIMARY KEY, customer TEXT, sku TEXT,"
            " quantity INTEGER, price TEXT)"
        )

    def add(self, order: Order) -> None:
        with self._db:
            for sku, qty, price in order.items:
                self._db.execute(
                    "INSERT INTO orders (id, customer, sku, quantity, price) VALUES (?, ?, ?, ?, ?)",
                    (order.order_id, order.customer, sku, qty, str(price)),
                )

    def for_customer(self, customer: str) -> list[Order]:
        rows = self._db.execute(
            "SELECT id, sku, quantity, price FROM orders WHERE customer = ? ORDER BY id", (customer,)
        ).fetchall()
        grouped: dict[int, list[tuple[str, int, Decimal]]] = {}
        for order_id, sku, qty, price in rows:
            grouped.setdefault(order_id, []).append((sku, qty, Decimal(price)))
        return [Order(oid, customer, tuple(items)) for oid, items in grouped.items()]


def discount(total: Decimal, loyalty_years: int) -> Decimal:
    """5% per loyalty year, at most 25%."""
    rate = min(Decimal("0.05") * loyalty_years, Decimal("0.25"))
    return (total * (1 - rate)).quantize(Decimal("0.01"))
