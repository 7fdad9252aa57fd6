DROP TABLE money_settings;
