"""The Jackpot sandbox's catalogue: stores, their offers, the values each allows, and stock."""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import ROUND_DOWN, Decimal
from typing import Any

DEFAULT_STORE_ID = "sandbox-store"
DEFAULT_OFFER_ID = "gift-card"
# Enough for every demo and benchmark run; a test that wants "out of stock" sets it lower.
DEFAULT_STOCK = 100_000
_CENT = Decimal("0.01")
_HUNDRED = Decimal(100)


@dataclass
class Offer:
    """An offer of a store: vouchers worth `min_value`..`max_value` in steps, at a discount."""

    id: str
    store_id: str
    name: str
    min_value: Decimal = Decimal(5)
    max_value: Decimal = Decimal(500)
    step: Decimal = Decimal(1)
    discount_pct: Decimal = Decimal(0)
    stock: int = DEFAULT_STOCK

    def allows(self, value: Decimal) -> bool:
        """Whether a voucher of this value is offered."""
        if not self.min_value <= value <= self.max_value:
            return False
        return (value - self.min_value) % self.step == 0

    def price_of(self, value: Decimal) -> Decimal:
        return (value * (_HUNDRED - self.discount_pct) / _HUNDRED).quantize(_CENT)

    def by_value(self, value: Decimal) -> tuple[Decimal, Decimal] | None:
        """(value, price) of a voucher of `value`; price <= value. None if not offered."""
        return (value, self.price_of(value)) if self.allows(value) else None

    def by_price(self, budget: Decimal) -> tuple[Decimal, Decimal] | None:
        """(value, price) of the most valuable voucher `budget` buys; value >= price."""
        if self.discount_pct >= _HUNDRED:
            return None
        most = budget * _HUNDRED / (_HUNDRED - self.discount_pct)
        steps = ((min(most, self.max_value) - self.min_value) / self.step).to_integral_value(
            ROUND_DOWN
        )
        value = self.min_value + steps * self.step
        if value < self.min_value or self.price_of(value) > budget:
            return None
        return value, self.price_of(value)

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "storeId": self.store_id,
            "name": self.name,
            "minValue": _number(self.min_value),
            "maxValue": _number(self.max_value),
            "step": _number(self.step),
            "discountPercent": _number(self.discount_pct),
            "stock": self.stock,
        }


@dataclass
class Store:
    id: str
    name: str
    offers: dict[str, Offer] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "offers": sorted(self.offers)}


def default_catalogue() -> dict[str, Store]:
    """One store with an open-value gift card and a small fixed one that runs out quickly."""
    store = Store(DEFAULT_STORE_ID, "Sandbox Store")
    store.offers[DEFAULT_OFFER_ID] = Offer(DEFAULT_OFFER_ID, store.id, "Gift card")
    store.offers["gift-card-50"] = Offer(
        "gift-card-50",
        store.id,
        "Gift card 50, 10 % off",
        min_value=Decimal(50),
        max_value=Decimal(50),
        discount_pct=Decimal(10),
        stock=5,
    )
    return {store.id: store}


def _number(value: Decimal) -> int | float:
    return int(value) if value == value.to_integral_value() else float(value)
